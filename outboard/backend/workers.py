"""Queues served by processes of their own: multi-queue devices on several cores.

CPython runs one thread of Python at a time, so the queues of one process share
one core however many there are. A device that sets ``queue_processes`` has
each running queue served by a child process instead: it is forked when the
queue starts and inherits everything it needs (the mapped guest memory, the
queue's kick, call and err eventfds, the device as it is configured now), so
nothing has to be sent to it. Guest memory is a shared mapping, so the child
reads and writes the same rings and buffers the driver does. What it counts
in the device's ``stats`` (a dict of ints) is added to the parent's when it
stops.

Anything that changes what a running queue works with (a new memory table, a
new call fd, the device's settings through SET_CONFIG, enabling or disabling
the ring) stops the child and forks a new one. Stopping is synchronous, as
for the in-process worker: the child answers with the ring positions and
exits, and only then does the parent go on (GET_VRING_BASE reports them).

The child runs no trio: a ``poll`` on the kick eventfd and its control socket,
then ``QueueRunner.drain``. It closes every inherited fd it does not need, so
the parent closing a connection is seen by the front-end at once; it leaves
SIGINT and SIGTERM to the parent (which stops it in order) and dies with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Callable

import trio

from .device import DeviceState
from .fd import OwnedFd
from .runtime import POLL_INTERVAL, QueueRunner
from .virtqueue import SplitQueue

__all__ = ["ProcessQueueRunner"]

log = logging.getLogger("outboard.workers")

#: the child's answer to STOP: last_avail_idx, used_idx, broken, failed chains,
#: interrupts, then the length of the JSON of its counters that follows
_REPLY = struct.Struct("<HHBIQI")
STOP = b"S"
KICK = b"K"
#: how long a child may take to finish its batch and answer (a flush of a
#: large write-through batch can take a while)
STOP_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


class ProcessQueueRunner(QueueRunner):
    """A ``QueueRunner`` whose worker is a child process."""

    def __init__(self, state: DeviceState, queue: SplitQueue) -> None:
        super().__init__(state, queue)
        self._child: tuple[int, socket.socket] | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return self._child is not None

    @property
    def enabled(self) -> bool:
        return self.queue.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value != self.queue.enabled:
            self._restart(lambda: setattr(self.queue, "enabled", value))

    @property
    def pid(self) -> int | None:
        return self._child[0] if self._child is not None else None

    def start(self, nursery: trio.Nursery) -> None:
        self.stop()
        self._nursery = nursery
        parent, child = socket.socketpair()
        parent_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            parent.close()
            child.close()
            raise
        if pid == 0:  # the child: never returns
            code = 1
            try:
                parent.close()
                code = self._serve(child, parent_pid)
            except BaseException:
                log.exception("queue %d: worker process failed", self.queue.index)
            finally:
                os._exit(code)
        child.close()
        self._child = (pid, parent)
        log.info("queue %d: served by process %d", self.queue.index, pid)

    def stop(self) -> None:
        """Stop the child and take over the ring positions it reports."""
        self.queue.notifier = None
        child, self._child = self._child, None
        if child is None:
            return
        pid, sock = child
        queue = self.queue
        try:
            sock.settimeout(STOP_TIMEOUT)
            sock.sendall(STOP)
            reply = _recv_exactly(sock, _REPLY.size)
            last, used, broken, failed, interrupts, size = _REPLY.unpack(reply)
            counters = json.loads(_recv_exactly(sock, size)) if size else {}
        except OSError as exc:
            log.error("queue %d: worker process %d did not answer (%s); ring state lost",
                      queue.index, pid, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            queue.broken = True
        else:
            queue.resume(last, used)
            _add_counters(self.state.device, counters)
            queue.failed_chains = failed
            self.interrupts = interrupts
            if broken and not queue.broken:
                queue.broken = True
                self.state.needs_reset()
        finally:
            sock.close()
            os.waitpid(pid, 0)

    def kick_now(self) -> None:
        if self._child is not None:
            try:
                self._child[1].sendall(KICK)
            except OSError as exc:
                log.error("queue %d: worker process gone: %s", self.queue.index, exc)

    def refresh(self) -> None:
        self._restart(lambda: None)

    def set_call(self, fd: OwnedFd | None) -> None:
        def swap() -> None:
            old, self.call = self.call, fd
            if old is not None:
                old.close()
        self._restart(swap)
        if self.running:
            # As in-process: a swap may race with a publish; signal the new fd once.
            self.signal()

    def set_err(self, fd: OwnedFd | None) -> None:
        def swap() -> None:
            old, self.err = self.err, fd
            if old is not None:
                old.close()
        self._restart(swap)

    def _restart(self, change: Callable[[], None]) -> None:
        running = self.running
        if running:
            self.stop()
        change()
        if running and self._nursery is not None and not self.queue.broken:
            self.start(self._nursery)

    # -- the child -----------------------------------------------------------

    def _serve(self, ctrl: socket.socket, parent_pid: int) -> int:
        kick = self.kick.fd if self.kick is not None and not self.kick.closed else -1
        keep = {0, 1, 2, ctrl.fileno(), kick, *self.state.device.queue_fds()}
        keep |= {fd.fd for fd in (self.call, self.err) if fd is not None and not fd.closed}
        _become_child(keep, parent_pid)
        queue = self.queue
        queue.notifier = self.signal
        poller = select.poll()
        poller.register(ctrl, select.POLLIN)
        if kick >= 0:
            poller.register(kick, select.POLLIN)
        timeout = None if kick >= 0 else POLL_INTERVAL * 1000
        counters_before = dict(_counters(self.state.device))
        while True:
            while self.drain():
                pass
            for fd, _ in poller.poll(timeout):
                if fd == kick:
                    with contextlib.suppress(BlockingIOError):
                        os.read(kick, 8)
                    continue
                message = ctrl.recv(64)
                if not message or STOP in message:
                    if message:
                        counters = json.dumps({
                            name: value - counters_before.get(name, 0)
                            for name, value in _counters(self.state.device).items()
                        }).encode()
                        ctrl.sendall(_REPLY.pack(queue.last_avail_idx, queue.used_idx,
                                                 queue.broken, queue.failed_chains,
                                                 self.interrupts, len(counters)) + counters)
                    return 0


def _counters(device: object) -> dict[str, int]:
    """A device's counters: its ``stats``, if that is a dict of ints."""
    stats = getattr(device, "stats", None)
    if isinstance(stats, dict):
        return {k: v for k, v in stats.items() if isinstance(k, str) and isinstance(v, int)}
    return {}


def _add_counters(device: object, counters: dict[str, int]) -> None:
    """Add what a queue process counted to the device's own ``stats``."""
    stats = getattr(device, "stats", None)
    if isinstance(stats, dict):
        for name, value in counters.items():
            stats[name] = stats.get(name, 0) + value


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed before it answered")
        data += chunk
    return data


def _become_child(keep: set[int], parent_pid: int) -> None:
    """Leave the parent's world: its signal handling, its fds, its life."""
    signal.set_wakeup_fd(-1)
    # Ctrl-C in a terminal (or a SIGTERM to the whole group) is for the parent,
    # which then stops its children in order; a child ends when its control
    # socket closes, or with the parent (the death signal).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    start = 0
    # (os.closerange(lo, hi) with hi <= lo would close everything from lo up)
    for fd in [*sorted(f for f in keep if f >= 0), _max_fd()]:
        if start < fd:
            os.closerange(start, fd)
        start = max(start, fd + 1)
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before the death signal was armed


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")
