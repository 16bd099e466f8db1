"""File descriptors with exactly one owner."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType


class OwnedFd:
    """An fd this process owns: closed exactly once, then it reads as -1.

    Closing twice is harmless; using a closed one gives EBADF on -1 instead of
    touching whatever fd number the kernel handed out next.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not an fd: {fd}")
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership and return the raw fd."""
        fd, self._fd = self._fd, -1
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"


def close_all(fds: Iterable[OwnedFd | None]) -> None:
    for owned in fds:
        if owned is not None:
            owned.close()
