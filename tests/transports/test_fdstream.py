"""FdStream over a real AF_UNIX socketpair, with real eventfds and memfds."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from outboard.backend.errors import RemoteProtocolError
from outboard.backend.fd import OwnedFd
from outboard.transports.fdstream import MAX_FDS_PER_MESSAGE, FdStream, unpack_fds

pytestmark = pytest.mark.usefixtures("fd_leak_check")


@asynccontextmanager
async def stream_pair() -> AsyncIterator[tuple[FdStream, FdStream]]:
    """Two connected FdStreams, closed on the way out."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a = FdStream(trio.socket.from_stdlib_socket(left))
    b = FdStream(trio.socket.from_stdlib_socket(right))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def close_all(fds: list[OwnedFd]) -> None:
    for fd in fds:
        fd.close()


async def test_data_and_fds_arrive_together() -> None:
    async with stream_pair() as (front, back):
        sent = eventfd()
        await front.send(b"hello", [sent.fd])
        data, fds = await back.receive(64)
        assert data == b"hello"
        assert len(fds) == 1
        received = fds[0]
        assert received.fd != sent.fd
        os.eventfd_write(received.fd, 5)  # the same eventfd, reached through a new fd
        assert os.eventfd_read(sent.fd) == 5
        received.close()
        sent.close()


async def test_memfd_arrives_as_the_same_memory() -> None:
    async with stream_pair() as (front, back):
        sent = OwnedFd(os.memfd_create("outboard-test", os.MFD_CLOEXEC))
        os.ftruncate(sent.fd, 4096)
        await front.send(b"m", [sent.fd])
        _, [received] = await back.receive(1)
        os.pwrite(received.fd, b"shared", 100)
        assert os.pread(sent.fd, 6, 100) == b"shared"
        received.close()
        sent.close()


async def test_fds_come_with_the_first_bytes_of_their_data() -> None:
    async with stream_pair() as (front, back):
        sent = [eventfd(), eventfd()]
        await front.send(b"abcdef", [fd.fd for fd in sent])
        data, fds = await back.receive(2)
        assert (data, len(fds)) == (b"ab", 2)
        assert await back.receive(64) == (b"cdef", [])
        close_all(fds + sent)


async def test_fds_of_the_next_send_are_not_merged_into_a_read() -> None:
    async with stream_pair() as (front, back):
        first, second = eventfd(), eventfd()
        await front.send(b"one", [first.fd])
        await front.send(b"two", [second.fd])
        data, fds = await back.receive(64)
        assert (data, len(fds)) == (b"one", 1)
        data, more = await back.receive(64)
        assert (data, len(more)) == (b"two", 1)
        close_all([*fds, *more, first, second])


async def test_eof_gives_empty_data_and_no_fds() -> None:
    async with stream_pair() as (front, back):
        front.close()
        assert await back.receive(64) == (b"", [])


async def test_aclose_closes_the_socket() -> None:
    async with stream_pair() as (front, back):
        await front.aclose()
        assert front.sock.fileno() == -1
        assert await back.receive(64) == (b"", [])


async def test_receive_exactly_across_chunks() -> None:
    async with stream_pair() as (front, back), trio.open_nursery() as nursery:
        first, second = eventfd(), eventfd()
        got: list[tuple[bytes, list[OwnedFd]]] = []

        async def reader() -> None:
            got.append(await back.receive_exactly(8))

        await front.send(b"abc", [first.fd])
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not got  # three bytes in, waiting for five more
        await front.send(b"defgh", [second.fd])
        await trio.testing.wait_all_tasks_blocked()
        [(data, fds)] = got
        assert data == b"abcdefgh"
        assert len(fds) == 2
        close_all([*fds, first, second])


async def test_receive_exactly_leaves_the_rest_in_the_socket() -> None:
    async with stream_pair() as (front, back):
        await front.send(b"0123456789")
        assert await back.receive_exactly(4) == (b"0123", [])
        assert await back.receive_exactly(6) == (b"456789", [])


async def test_eof_in_the_middle_of_receive_exactly_closes_the_fds_received() -> None:
    async with stream_pair() as (front, back):
        sent = eventfd()
        await front.send(b"abc", [sent.fd])
        front.close()
        with pytest.raises(trio.EndOfChannel):
            await back.receive_exactly(8)
        sent.close()


async def test_send_delivers_everything_past_a_full_socket_buffer() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, more than a socket buffer holds
    async with stream_pair() as (front, back), trio.open_nursery() as nursery:
        sent = eventfd()
        nursery.start_soon(front.send, payload, [sent.fd])
        data, fds = await back.receive_exactly(len(payload))
        assert data == payload
        assert len(fds) == 1
        close_all([*fds, sent])


async def test_as_many_fds_as_allowed_arrive() -> None:
    async with stream_pair() as (front, back):
        sent = [eventfd() for _ in range(MAX_FDS_PER_MESSAGE)]
        await front.send(b"x", [fd.fd for fd in sent])
        data, fds = await back.receive(1)
        assert (data, len(fds)) == (b"x", MAX_FDS_PER_MESSAGE)
        close_all(fds + sent)


async def test_more_fds_than_allowed_is_a_protocol_error_and_leaks_nothing() -> None:
    async with stream_pair() as (front, back):
        sent = [eventfd() for _ in range(MAX_FDS_PER_MESSAGE + 1)]
        await front.send(b"x", [fd.fd for fd in sent])
        with pytest.raises(RemoteProtocolError):
            await back.receive(1)
        close_all(sent)


async def test_more_fds_than_allowed_in_receive_exactly_leaks_nothing() -> None:
    async with stream_pair() as (front, back):
        first = eventfd()
        flood = [eventfd() for _ in range(MAX_FDS_PER_MESSAGE + 1)]
        await front.send(b"ab", [first.fd])
        await front.send(b"cd", [fd.fd for fd in flood])
        with pytest.raises(RemoteProtocolError):
            await back.receive_exactly(4)
        close_all([first, *flood])


async def test_connect_to_a_listening_path(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    client = await FdStream.connect(path)
    sock, _ = await listener.accept()
    server = FdStream(sock)
    await client.send(b"ping")
    assert await server.receive(4) == (b"ping", [])
    client.close()
    server.close()
    listener.close()


async def test_connect_to_nothing_leaks_no_socket(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await FdStream.connect(str(tmp_path / "nobody-here"))


def test_unpack_fds_ignores_other_ancillary_data_and_partial_ints() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    data = array.array("i", [fd]).tobytes()
    owned = unpack_fds([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, bytes(12)),
                        (socket.SOL_SOCKET, socket.SCM_RIGHTS, data + b"\1\2")])
    assert [o.fd for o in owned] == [fd]
    close_all(owned)
