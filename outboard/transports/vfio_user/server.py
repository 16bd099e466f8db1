"""The trio shell around the vfio-user core: sockets, fds, tasks.

One client at a time, one after another: the server listens on a unix socket
(QEMU's vfio-user-pci connects to it). Each connection gets a fresh virtio-pci
function over the device and lives in its own nursery; when the client goes,
its DMA windows are unmapped, its eventfds closed and the device reset.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence

import trio

from ...backend.device import DeviceState, VirtioDevice
from ...backend.errors import DeviceError, OutboardError
from ...backend.fd import OwnedFd
from ...backend.pci.virtio_pci import VirtioPciFunction
from ...backend.runtime import Runtime
from ..fdstream import FdStream
from ..listen import accept_loop, listen_on_path
from .connection import NEED_DATA, MessageError, Reply, Request, ServerConnection
from .dma import DmaTable
from .handler import VfioUserHandler
from .wire import MAX_DATA_XFER_SIZE, Command, DmaAccess

__all__ = ["VfioUserSession", "serve_connection", "serve_listener", "serve_path"]

log = logging.getLogger("outboard.vfio_user")


class VfioUserSession:
    """One client connection: the request loop, the replies, our own commands."""

    def __init__(self, stream: FdStream, conn: ServerConnection, handler: VfioUserHandler,
                 function: VirtioPciFunction, nursery: trio.Nursery) -> None:
        self.stream = stream
        self.conn = conn
        self.handler = handler
        self.function = function
        self.dma = handler.dma
        self.nursery = nursery
        self._send_lock = trio.Lock()
        self._waiting: dict[int, tuple[trio.Event, list[Reply]]] = {}
        self._closed = False
        self._unmask_scope: trio.CancelScope | None = None
        handler.set_intx_unmask_fd = self._set_intx_unmask_fd

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        async with self._send_lock:
            await self.stream.send(data, fds)

    # -- the request loop --------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it disconnects or breaks the protocol."""
        conn = self.conn
        stream = self.stream
        while True:
            data, fds = await stream.receive(conn.bytes_needed())
            if not data:
                if fds:
                    for fd in fds:
                        fd.close()
                if conn.has_pending():
                    log.warning("client disconnected in the middle of a message")
                else:
                    log.info("client disconnected")
                return
            conn.receive(data, fds)
            while True:
                try:
                    event = conn.next_event()
                except MessageError as exc:
                    if exc.reply is not None:
                        await self.send(exc.reply)
                    if exc.fatal:
                        raise
                    log.warning("client message refused (errno %d): %s", exc.errno, exc)
                    continue
                if event is NEED_DATA:
                    break
                if isinstance(event, Reply):
                    self._wake(event)
                    continue
                assert isinstance(event, Request)
                answer = self.handler.dispatch(event)
                if answer is not None:
                    await self.send(*answer)

    # -- commands to the client (DMA_READ / DMA_WRITE) -----------------------
    # The payloads follow the spec: address (u64), count (u64), then the data
    # at offset 16. QEMU 10.x declares count as u32 and puts the data at offset
    # 12 instead, so data moved this way to or from QEMU is shifted by 4 bytes;
    # virtqueues never need it (QEMU maps all guest RAM with an fd).

    def _wake(self, reply: Reply) -> None:
        waiter = self._waiting.pop(reply.msg_id, None)
        if waiter is None:
            log.warning("reply %d to a command nobody waits for", reply.msg_id)
            return
        event, slot = waiter
        slot.append(reply)
        event.set()

    async def _command(self, command: Command, payload: bytes) -> Reply:
        if self._closed:
            raise DeviceError("the client is gone")
        msg_id, data = self.conn.command(command, payload)
        event = trio.Event()
        slot: list[Reply] = []
        self._waiting[msg_id] = (event, slot)
        try:
            await self.send(data)
            await event.wait()
        finally:
            if not slot:
                self._waiting.pop(msg_id, None)
                self.conn.forget(msg_id)
        if not slot:
            raise DeviceError("the client is gone")
        return slot[0]

    def _chunk(self) -> int:
        return max(1, min(self.conn.client.max_data_xfer_size, MAX_DATA_XFER_SIZE))

    async def dma_read(self, iova: int, size: int) -> bytes:
        """Read client memory: from the mapping when the window has one, else
        with DMA_READ commands of at most ``max_data_xfer_size`` bytes."""
        region = self.dma.find(iova, size)
        if region is None:
            raise DeviceError(f"DMA read of {iova:#x}+{size:#x} outside every window")
        if not region.readable:
            raise DeviceError(f"DMA read of {iova:#x}+{size:#x} from a window without READ")
        if region.mapped is not None:
            return self.dma.memory.read(iova, size)
        out = bytearray()
        while len(out) < size:
            count = min(self._chunk(), size - len(out))
            address = iova + len(out)
            reply = await self._command(Command.DMA_READ, bytes(DmaAccess(address, count)))
            if reply.failed:
                raise DeviceError(f"DMA_READ of {address:#x}+{count:#x} failed: "
                                  f"errno {reply.error}")
            data = reply.payload[16:]
            if len(data) != count:
                raise DeviceError(f"DMA_READ of {count} bytes answered with {len(data)}")
            out += data
        return bytes(out)

    async def dma_write(self, iova: int, data: bytes) -> None:
        """Write client memory, through the mapping or with DMA_WRITE commands."""
        size = len(data)
        region = self.dma.find(iova, size)
        if region is None:
            raise DeviceError(f"DMA write of {iova:#x}+{size:#x} outside every window")
        if not region.writable:
            raise DeviceError(f"DMA write of {iova:#x}+{size:#x} to a window without WRITE")
        if region.mapped is not None:
            self.dma.memory.write(iova, data)
            return
        done = 0
        while done < size:
            count = min(self._chunk(), size - done)
            address = iova + done
            payload = bytes(DmaAccess(address, count)) + data[done:done + count]
            reply = await self._command(Command.DMA_WRITE, payload)
            if reply.failed:
                raise DeviceError(f"DMA_WRITE of {address:#x}+{count:#x} failed: "
                                  f"errno {reply.error}")
            done += count

    # -- the INTx unmask eventfd -------------------------------------------

    def _set_intx_unmask_fd(self, fd: OwnedFd | None) -> None:
        intx = self.function.intx
        old = intx.unmask_fd
        if self._unmask_scope is not None:
            self._unmask_scope.cancel()
            self._unmask_scope = None
        if old is not None and old is not fd:
            trio.lowlevel.notify_closing(old.fd)
        intx.set_unmask_fd(fd)
        if fd is not None and not self._closed:
            scope = trio.CancelScope()
            self._unmask_scope = scope
            self.nursery.start_soon(self._watch_unmask, scope, fd.fd, name="intx-unmask")

    async def _watch_unmask(self, scope: trio.CancelScope, fd: int) -> None:
        """A write to the unmask eventfd unmasks INTx (a KVM resample eventfd)."""
        with scope:
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 8)
                    self.function.intx.unmask()
            except (trio.ClosedResourceError, OSError):
                pass

    def close(self) -> None:
        """The client is gone: wake every waiter, stop watching, release all."""
        self._closed = True
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()
        self._set_intx_unmask_fd(None)


async def serve_connection(
    device: VirtioDevice,
    stream: FdStream,
    *,
    task_status: trio.TaskStatus[VfioUserSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one client until it disconnects or breaks the protocol."""
    if device.queue_processes:
        # Interrupts go through the MSI-X table (masks, pending bits) here, in
        # this process: the queues stay in it too.
        log.warning("queue processes are for vhost-user: serving every queue in this process")
        device.queue_processes = False
    state = DeviceState(device)
    conn = ServerConnection()
    dma = DmaTable()
    try:
        async with trio.open_nursery() as nursery:
            runtime = Runtime(state, nursery)
            function = VirtioPciFunction(state, runtime, dma.memory)
            handler = VfioUserHandler(conn, function, dma, memory_changed=function.memory_changed)
            session = VfioUserSession(stream, conn, handler, function, nursery)
            nursery.start_soon(device.run, name=f"{type(device).__name__}.run")
            task_status.started(session)
            try:
                await session.run()
            except MessageError as exc:
                log.error("client broke the protocol, dropping the connection: %s", exc)
            except (OSError, trio.BrokenResourceError, trio.EndOfChannel,
                    OutboardError) as exc:
                log.error("connection failed: %s", exc)
            finally:
                session.close()
                function.close()
                dma.clear()
                nursery.cancel_scope.cancel()
    finally:
        conn.close()
        stream.close()
        device.reset()


async def serve_listener(
    device: VirtioDevice,
    listener: trio.socket.SocketType,
    *,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept clients on ``listener``, one after another."""
    await accept_loop(listener, functools.partial(serve_connection, device), peer="client",
                      max_connections=max_connections, task_status=task_status)


async def serve_path(
    device: VirtioDevice,
    path: str,
    *,
    max_connections: int | None = None,
    on_ready: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the unix socket ``path`` (QEMU's vfio-user-pci connects to it)."""
    await listen_on_path(path, functools.partial(serve_connection, device), peer="client",
                         label=" (vfio-user)", max_connections=max_connections, on_ready=on_ready,
                         task_status=task_status)
