"""Bytes and the fds that came with them, for the protocol cores.

Over a unix stream socket an fd arrives with the chunk of data it was sent
with; it belongs to the message that chunk starts in. ``FdBuffer`` keeps the
stream offset of every batch of fds so that ``take`` hands each message exactly
its own.
"""

from __future__ import annotations

from ..backend.fd import OwnedFd, close_all

__all__ = ["FdBuffer"]


class FdBuffer:
    """The unparsed bytes of a connection and the fds that came with them (owned)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._offset = 0  # stream offset of data[0]
        self._fds: list[tuple[int, list[OwnedFd]]] = []

    def feed(self, data: bytes, fds: list[OwnedFd]) -> None:
        if fds:
            self._fds.append((self._offset + len(self.data), fds))
        self.data += data

    def take(self, size: int) -> tuple[bytes, list[OwnedFd]]:
        """The first ``size`` bytes and every fd that came with them."""
        message = bytes(self.data[:size])
        end = self._offset + size
        fds: list[OwnedFd] = []
        while self._fds and self._fds[0][0] < end:
            fds.extend(self._fds.pop(0)[1])
        del self.data[:size]
        self._offset = end
        return message, fds

    @property
    def pending(self) -> bool:
        """Is part of a message, or an fd, still waiting?"""
        return bool(self.data or self._fds)

    def close(self) -> None:
        """Drop the bytes and close every fd still held."""
        for _, fds in self._fds:
            close_all(fds)
        self._fds.clear()
        self.data.clear()
