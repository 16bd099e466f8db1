"""Fixtures shared by the whole suite."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest


def open_fds() -> dict[int, str]:
    """Every fd this process has open, with what it points at."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the fd of the directory listing itself, closed again
    return fds


@pytest.fixture
def fd_leak_check() -> Iterator[None]:
    """Fail the test if it leaves an fd open that was not open before it.

    An fd that looks leaked is looked at again after a garbage collection, so
    that one held only by a reference cycle (a traceback kept by
    ``pytest.raises``, say) is not reported; an ``OwnedFd`` nobody closed stays
    open whatever the collector does.
    """
    before = open_fds()
    yield

    def leaked() -> dict[int, str]:
        return {fd: target for fd, target in open_fds().items() if before.get(fd) != target}

    if leaked():
        gc.collect()
    assert not leaked(), f"fds leaked by the test: {leaked()}"
