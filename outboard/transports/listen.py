"""Unix-socket listening shared by the transports: bind, accept one at a time."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable

import trio

from .fdstream import FdStream

__all__ = ["accept_loop", "bind_unix", "listen_on_path"]

log = logging.getLogger("outboard")


async def bind_unix(path: str) -> trio.socket.SocketType:
    """A listening socket at ``path`` (a stale socket file from an earlier run is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def accept_loop(
    listener: trio.socket.SocketType,
    handle: Callable[[FdStream], Awaitable[None]],
    *,
    peer: str,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve connections on ``listener`` one after another (the VMM reconnects)."""
    task_status.started()
    served = 0
    while max_connections is None or served < max_connections:
        sock, _ = await listener.accept()
        served += 1
        log.info("%s connected", peer)
        await handle(FdStream(sock))


async def listen_on_path(
    path: str,
    handle: Callable[[FdStream], Awaitable[None]],
    *,
    peer: str,
    label: str = "",
    max_connections: int | None = None,
    on_ready: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the unix socket ``path``; remove it again when done."""
    listener = await bind_unix(path)
    try:
        log.info("listening on %s%s", path, label)
        if on_ready is not None:
            on_ready(path)
        await accept_loop(listener, handle, peer=peer, max_connections=max_connections,
                          task_status=task_status)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
