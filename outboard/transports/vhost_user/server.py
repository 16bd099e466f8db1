"""The trio shell around the vhost-user core: sockets, fds, tasks.

One connection at a time (vhost-user is one front-end to one back-end); after a
disconnect the device is reset and the next connection is served, because QEMU
reconnects.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable

import trio

from ...backend.device import DeviceState, VirtioDevice
from ...backend.errors import RemoteProtocolError
from ...backend.runtime import Runtime
from ..fdstream import FdStream
from ..listen import accept_loop, listen_on_path
from .backend import VhostUserBackend
from .connection import NEED_DATA, BackendConnection, Request
from .wire import SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature

__all__ = ["serve_connect", "serve_connection", "serve_listener", "serve_path"]

log = logging.getLogger("outboard.vhost_user")

#: how long to wait between attempts to reach a front-end that listens
CONNECT_RETRY_INTERVAL = 0.2


def protocol_features_for(device: VirtioDevice) -> int:
    """What we offer: CONFIG only for a device that has a config space (QEMU
    warns about a back-end offering it for a device type that has none)."""
    features = SUPPORTED_PROTOCOL_FEATURES
    if not device.config():
        features &= ~(1 << ProtocolFeature.CONFIG)
    return features


async def serve_connection(device: VirtioDevice, stream: FdStream) -> None:
    """Serve one front-end until it disconnects or breaks the protocol."""
    state = DeviceState(device)
    conn = BackendConnection(protocol_features_for(device))
    try:
        async with trio.open_nursery() as nursery:
            runtime = Runtime(state, nursery, processes=device.queue_processes)
            backend = VhostUserBackend(state, runtime, conn)
            device.set_settings_notifier(runtime.refresh)
            nursery.start_soon(device.run, name=f"{type(device).__name__}.run")
            try:
                await _request_loop(stream, conn, backend)
            except RemoteProtocolError as exc:
                log.error("front-end broke the protocol, dropping the connection: %s", exc)
            except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
                log.error("connection failed: %s", exc)
            finally:
                backend.close()
                nursery.cancel_scope.cancel()
    finally:
        device.set_settings_notifier(None)
        conn.close()
        stream.close()
        device.reset()


async def _request_loop(stream: FdStream, conn: BackendConnection,
                        backend: VhostUserBackend) -> None:
    while True:
        data, fds = await stream.receive(conn.bytes_needed())
        if not data:
            if conn.has_pending():
                log.warning("front-end disconnected in the middle of a message")
            else:
                log.info("front-end disconnected")
            return
        conn.receive(data, fds)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                if exc.fatal or not isinstance(exc.request, Request):
                    raise
                answer = backend.refuse(exc.request, exc)
            else:
                if event is NEED_DATA:
                    break
                assert isinstance(event, Request)
                answer = backend.dispatch(event)
            if answer is not None:
                await stream.send(answer)


async def serve_listener(
    device: VirtioDevice,
    listener: trio.socket.SocketType,
    *,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept front-ends on ``listener``, one after another."""
    await accept_loop(listener, functools.partial(serve_connection, device), peer="front-end",
                      max_connections=max_connections, task_status=task_status)


async def serve_path(
    device: VirtioDevice,
    path: str,
    *,
    max_connections: int | None = None,
    on_ready: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the unix socket ``path`` (QEMU connects to it)."""
    await listen_on_path(path, functools.partial(serve_connection, device), peer="front-end",
                         label="", max_connections=max_connections, on_ready=on_ready,
                         task_status=task_status)


async def serve_connect(
    device: VirtioDevice,
    path: str,
    *,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to a front-end that listens on ``path`` (QEMU's ``server=on``),
    retrying until it appears, and again after each disconnect."""
    task_status.started()
    served = 0
    waiting_logged = False
    while max_connections is None or served < max_connections:
        try:
            stream = await FdStream.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
            if not waiting_logged:
                log.info("waiting for a front-end to listen on %s", path)
                waiting_logged = True
            await trio.sleep(CONNECT_RETRY_INTERVAL)
            continue
        waiting_logged = False
        served += 1
        log.info("connected to front-end at %s", path)
        await serve_connection(device, stream)
