"""The trio part: one task per running queue, kicks in, interrupts out.

Each running queue has a worker task that waits on its kick eventfd and then
drains the ring through the device (``device.process``), publishing the used
index and writing the call eventfd once per batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import trio

from .device import DeviceState
from .fd import OwnedFd
from .virtqueue import SplitQueue

__all__ = ["QueueRunner", "Runtime"]

log = logging.getLogger("outboard.runtime")

_ONE = (1).to_bytes(8, "little")
#: how often a queue without a kick fd (the front-end asked for polling) is polled
POLL_INTERVAL = 0.001
#: how long a worker goes on with a queue that keeps having work before it
#: lets other tasks run (other queues and devices, the front-end's messages)
SLICE = 0.002
_clock = time.perf_counter


def _signal(fd: OwnedFd | None) -> None:
    if fd is not None and not fd.closed:
        try:
            os.write(fd.fd, _ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the reader has a wake-up pending anyway


class QueueRunner:
    """The notification side of one queue: kick, call and err fds, run state."""

    def __init__(self, state: DeviceState, queue: SplitQueue) -> None:
        self.state = state
        self.queue = queue
        self.kick: OwnedFd | None = None
        self.call: OwnedFd | None = None
        self.err: OwnedFd | None = None
        self.polling = False
        self.interrupts = 0
        #: how an interrupt is raised: the call eventfd here; a transport may
        #: route it elsewhere (an MSI-X vector, with its mask and pending bit)
        self.interrupt: Callable[[], None] = self._write_call
        self._scope: trio.CancelScope | None = None
        self._watched_fd = -1
        queue.on_error = self._on_queue_error

    @property
    def running(self) -> bool:
        return self._scope is not None

    @property
    def enabled(self) -> bool:
        return self.queue.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.queue.enabled = value

    def signal(self) -> None:
        self.interrupts += 1
        self.interrupt()

    def _write_call(self) -> None:
        _signal(self.call)

    def _on_queue_error(self, queue: SplitQueue, reason: str) -> None:
        _signal(self.err)

    def drain(self, rounds: int = 64) -> bool:
        """Let the device process available chains, publishing and interrupting
        once per batch; True if work is left after ``rounds`` batches or after
        ``SLICE`` seconds (the worker then lets other tasks run before it goes
        on)."""
        queue = self.queue
        if not queue.enabled or not queue.ready:
            return False
        device = self.state.device
        deadline = _clock() + SLICE
        for _ in range(rounds):
            before = queue.last_avail_idx
            try:
                device.process(queue)
                notify = queue.publish()
                # Always re-arm (a queue restarted at a new base must ask for
                # kicks from there); go round again only if there was progress.
                more = queue.enable_kicks()
            except Exception:
                # A bug in the device (or the queue): this queue stops, the others go on.
                log.exception("queue %d: device failed; queue stopped", queue.index)
                queue.broken = True
                self.state.needs_reset()
                _signal(self.err)
                return False
            if notify:
                self.signal()
            if not more or queue.last_avail_idx == before:
                return False
            if _clock() > deadline:
                return True
        return True

    def kick_now(self) -> None:
        """Process the queue now (an in-band kick, a ring enabled)."""
        if self.running:
            self.drain()

    def refresh(self) -> None:
        """The memory table or the device's settings changed. The worker task
        reads both afresh every time: nothing to do here."""

    def set_call(self, fd: OwnedFd | None) -> None:
        """Swap the call fd. Signals already written went to the old fd, which the
        front-end owns and checks itself when it unmasks; to be safe against a
        swap racing with a publish, a running queue also signals the new fd once
        (a spurious interrupt is harmless, a lost one hangs the driver)."""
        old, self.call = self.call, fd
        if old is not None:
            old.close()
        if self.running and fd is not None:
            self.signal()

    def set_err(self, fd: OwnedFd | None) -> None:
        old, self.err = self.err, fd
        if old is not None:
            old.close()

    def close(self) -> None:
        self.stop()
        for fd in (self.kick, self.call, self.err):
            if fd is not None:
                fd.close()
        self.kick = self.call = self.err = None

    def stop(self) -> None:
        """Stop the worker. Synchronous: the worker only touches the queue between
        checkpoints, so once this returns the ring state is final."""
        self.queue.notifier = None
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        if self._watched_fd >= 0:
            trio.lowlevel.notify_closing(self._watched_fd)
            self._watched_fd = -1

    def start(self, nursery: trio.Nursery) -> None:
        self.stop()
        scope = trio.CancelScope()
        self._scope = scope
        kick_fd = self.kick.fd if self.kick is not None else -1
        self._watched_fd = kick_fd
        self.queue.notifier = self.signal
        nursery.start_soon(self._worker, scope, kick_fd, name=f"queue-{self.queue.index}")

    async def _worker(self, scope: trio.CancelScope, kick_fd: int) -> None:
        with scope:
            if scope.cancel_called:
                return  # stopped before it ever ran: the ring state is already final
            try:
                while self.drain():
                    await trio.lowlevel.checkpoint()
                while True:
                    if kick_fd < 0:
                        await trio.sleep(POLL_INTERVAL)
                    else:
                        await trio.lowlevel.wait_readable(kick_fd)
                        if scope.cancel_called:
                            return  # stopped (and the fd maybe closed) since it woke
                        try:
                            os.read(kick_fd, 8)
                        except BlockingIOError:
                            pass
                    while self.drain():
                        await trio.lowlevel.checkpoint()
            except trio.ClosedResourceError:
                pass


class Runtime:
    """The queue runners of one device on one connection."""

    def __init__(self, state: DeviceState, nursery: trio.Nursery, *,
                 processes: bool = False) -> None:
        self.state = state
        self.nursery = nursery
        self.runners: list[QueueRunner] = []
        #: stops every queue of a process group at once (else each queue's stop
        #: would start the group afresh for the queues left)
        self._stop_groups: list[Callable[[], None]] = []
        if processes:
            from .workers import ProcessQueueRunner, QueueProcess
            groups: dict[int, QueueProcess] = {}
            for queue in state.queues:
                group = state.device.queue_group(queue.index)
                if group is None:
                    self.runners.append(QueueRunner(state, queue))
                else:
                    process = groups.setdefault(group, QueueProcess(state, group))
                    self.runners.append(ProcessQueueRunner(state, queue, process))
            self._stop_groups = [g.stop_all for g in groups.values()]
        else:
            self.runners = [QueueRunner(state, q) for q in state.queues]

    def runner(self, index: int) -> QueueRunner:
        self.state.queue(index)  # raises a clear DeviceError for a bad index
        return self.runners[index]

    def start(self, index: int) -> None:
        self.runners[index].start(self.nursery)

    def kick(self, index: int) -> None:
        """Process a queue now (in-band kicks, enabling a queue)."""
        self.runners[index].kick_now()

    def refresh(self) -> None:
        """The memory table or the device's settings changed (see ``QueueRunner.refresh``)."""
        for runner in self.runners:
            runner.refresh()

    def stop_all(self) -> None:
        for stop in self._stop_groups:
            stop()
        for runner in self.runners:
            runner.stop()

    def close(self) -> None:
        for stop in self._stop_groups:
            stop()
        for runner in self.runners:
            runner.close()
