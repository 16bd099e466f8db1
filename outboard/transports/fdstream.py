"""A unix stream socket that carries fds (SCM_RIGHTS), for trio."""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

import trio

from ..backend.errors import RemoteProtocolError
from ..backend.fd import OwnedFd, close_all

__all__ = ["MAX_FDS_PER_MESSAGE", "FdStream", "unpack_fds"]

#: the most fds we accept with one chunk of data (more is a protocol error)
MAX_FDS_PER_MESSAGE = 16
_ANCBUF = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


def unpack_fds(ancdata: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
    return [OwnedFd(fd) for fd in fds]


class FdStream:
    """Owns one connected AF_UNIX stream socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: str) -> FdStream:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def receive(self, max_bytes: int) -> tuple[bytes, list[OwnedFd]]:
        """Up to ``max_bytes`` and the fds that came with them; b"" at EOF."""
        data, ancdata, flags, _ = await self.sock.recvmsg(
            max_bytes, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        fds = unpack_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise RemoteProtocolError(
                f"more than {MAX_FDS_PER_MESSAGE} fds in one message (the rest were dropped)")
        return data, fds

    async def receive_exactly(self, size: int) -> tuple[bytes, list[OwnedFd]]:
        chunks: list[bytes] = []
        fds: list[OwnedFd] = []
        try:
            while size:
                data, more = await self.receive(size)
                fds.extend(more)
                if not data:
                    raise trio.EndOfChannel("connection closed mid-message")
                chunks.append(data)
                size -= len(data)
        except BaseException:
            close_all(fds)
            raise
        return b"".join(chunks), fds

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self.sock.sendmsg([view], anc)
            view = view[sent:]
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    def close(self) -> None:
        self.sock.close()

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()
