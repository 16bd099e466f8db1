"""Queues served by processes of their own: multi-queue devices on several cores.

CPython runs one thread of Python at a time, so the queues of one process share
one core however many there are. A device that sets ``queue_processes`` has
its running queues served by child processes instead, one per group
(``VirtioDevice.queue_group``: each queue alone by default, a network device's
queue pair together). A child is forked when a queue of its group starts and
inherits everything it needs (the mapped guest memory, the queues' kick, call
and err eventfds, the device as it is configured now), so nothing has to be
sent to it. Guest memory is a shared mapping, so the child reads and writes
the same rings and buffers the driver does. What it counts in the device's
``stats`` (a dict or a dataclass of ints) is added to the parent's when it
stops. Queues of no group (a control queue) stay in the parent's trio runtime.

Anything that changes what a running queue works with (a new memory table, a
new call fd, the device's settings through SET_CONFIG or a control queue,
enabling or disabling a ring, another queue of the group starting or stopping)
stops the child and forks a new one. Stopping is synchronous, as for the
in-process worker: the child answers with the ring positions and exits, and
only then does the parent go on (GET_VRING_BASE reports them).

The child runs no trio: a ``poll`` on the kick eventfds, its control socket and
the fds the device names (``group_fds``), then ``QueueRunner.drain`` for each
queue and the device's ``group_poll``. It closes every inherited fd it does not
need, so the parent closing a connection is seen by the front-end at once; it
leaves SIGINT and SIGTERM to the parent (which stops it in order) and dies
with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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

#: the child's answer to STOP, per queue it served: index, last_avail_idx,
#: used_idx, broken, failed chains, interrupts
_QUEUE_REPLY = struct.Struct("<HHHBIQ")
#: then: how many queues, the length of the JSON of its counters that follows
_REPLY_HEAD = struct.Struct("<HI")
STOP = b"S"
KICK = b"K"
#: how long a child may take to finish its batch and answer (a flush of a
#: large write-through batch can take a while)
STOP_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


class QueueProcess:
    """The child process serving the running queues of one group
    (``VirtioDevice.queue_group``): a queue alone, or a network device's
    queue pair with its port."""

    def __init__(self, state: DeviceState, group: int) -> None:
        self.state = state
        self.group = group
        self.members: list[ProcessQueueRunner] = []
        self.nursery: trio.Nursery | None = None
        self._child: tuple[int, socket.socket, list[ProcessQueueRunner]] | None = None

    @property
    def pid(self) -> int | None:
        return self._child[0] if self._child is not None else None

    def restart(self, change: Callable[[], None]) -> None:
        """Stop the child (if any), apply ``change``, fork a new one for the
        queues that run now."""
        self._stop()
        change()
        served = [m for m in self.members if m.started and not m.queue.broken]
        if served and self.nursery is not None:
            self._start(served)

    def stop_all(self) -> None:
        """Stop every queue of the group with one stop of the child."""
        def stop() -> None:
            for member in self.members:
                member.started = False
                member.queue.notifier = None
        self.restart(stop)

    def kick(self) -> None:
        if self._child is not None:
            try:
                self._child[1].sendall(KICK)
            except OSError as exc:
                log.error("queue group %d: worker process gone: %s", self.group, exc)

    def _start(self, served: list[ProcessQueueRunner]) -> None:
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
                code = _serve(self.state, self.group, served, child, parent_pid)
            except BaseException:
                log.exception("queue group %d: worker process failed", self.group)
            finally:
                os._exit(code)
        child.close()
        self._child = (pid, parent, served)
        for member in served:
            log.info("queue %d: served by process %d", member.queue.index, pid)

    def _stop(self) -> None:
        """Stop the child; its queues take over the ring positions it reports."""
        child, self._child = self._child, None
        if child is None:
            return
        pid, sock, served = child
        try:
            sock.settimeout(STOP_TIMEOUT)
            sock.sendall(STOP)
            count, size = _REPLY_HEAD.unpack(_recv_exactly(sock, _REPLY_HEAD.size))
            replies = [_QUEUE_REPLY.unpack(_recv_exactly(sock, _QUEUE_REPLY.size))
                       for _ in range(count)]
            counters = json.loads(_recv_exactly(sock, size)) if size else {}
        except OSError as exc:
            log.error("queue group %d: worker process %d did not answer (%s); ring state lost",
                      self.group, pid, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for member in served:
                member.queue.broken = True
        else:
            by_index = {m.queue.index: m for m in served}
            for index, last, used, broken, failed, interrupts in replies:
                member = by_index[index]
                queue = member.queue
                queue.resume(last, used)
                queue.failed_chains = failed
                member.interrupts = interrupts
                if broken and not queue.broken:
                    queue.broken = True
                    self.state.needs_reset()
            _add_counters(self.state.device, counters)
        finally:
            sock.close()
            os.waitpid(pid, 0)


class ProcessQueueRunner(QueueRunner):
    """A ``QueueRunner`` whose worker is the child process of its group."""

    def __init__(self, state: DeviceState, queue: SplitQueue,
                 process: QueueProcess | None = None) -> None:
        super().__init__(state, queue)
        self.process = process if process is not None else QueueProcess(state, queue.index)
        self.process.members.append(self)
        self.started = False

    @property
    def running(self) -> bool:
        return self.started

    @property
    def enabled(self) -> bool:
        return self.queue.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value != self.queue.enabled:
            self._change(lambda: setattr(self.queue, "enabled", value))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.started else None

    def start(self, nursery: trio.Nursery) -> None:
        self.process.nursery = nursery

        def start() -> None:
            self.started = True
        self.process.restart(start)

    def stop(self) -> None:
        """Synchronous: once this returns the queue's ring state is final."""
        self.queue.notifier = None
        if self.started:
            def stop() -> None:
                self.started = False
            self.process.restart(stop)

    def kick_now(self) -> None:
        if self.started:
            self.process.kick()

    def refresh(self) -> None:
        # Once per group: the first of its running queues restarts it.
        if self.started and next(m for m in self.process.members if m.started) is self:
            self.process.restart(lambda: None)

    def set_call(self, fd: OwnedFd | None) -> None:
        # The child has the old call fd: a new child for the new one.
        self._change(lambda: super(ProcessQueueRunner, self).set_call(fd))

    def set_err(self, fd: OwnedFd | None) -> None:
        self._change(lambda: super(ProcessQueueRunner, self).set_err(fd))

    def _change(self, change: Callable[[], None]) -> None:
        if self.started:
            self.process.restart(change)
        else:
            change()


# -- the child -----------------------------------------------------------------


def _serve(state: DeviceState, group: int, served: list[ProcessQueueRunner],
           ctrl: socket.socket, parent_pid: int) -> int:
    device = state.device
    kicks = {m.kick.fd: m for m in served if m.kick is not None and not m.kick.closed}
    keep = {0, 1, 2, ctrl.fileno(), *kicks, *device.queue_fds()}
    for member in served:
        keep |= {fd.fd for fd in (member.call, member.err) if fd is not None and not fd.closed}
    _become_child(keep, parent_pid)
    for member in served:
        member.queue.notifier = member.signal
    poller = select.poll()
    poller.register(ctrl, select.POLLIN)
    for fd in kicks:
        poller.register(fd, select.POLLIN)
    watched: set[int] = set()
    # A queue without a kick fd (the front-end asked for polling) is polled.
    idle_timeout = POLL_INTERVAL * 1000 if len(kicks) < len(served) else None
    counters_before = _counters(device)
    while True:
        # One drain of each queue (up to 64 batches), then a look at the
        # control socket and the kicks: a driver that keeps a ring full (a
        # DPDK sender) must not keep a STOP waiting.
        busy = False
        for member in served:
            busy |= member.drain()
        busy |= device.group_poll(group)
        wanted = set(device.group_fds(group))
        for fd in watched - wanted:
            poller.unregister(fd)
        for fd in wanted - watched:
            poller.register(fd, select.POLLIN)
        watched = wanted
        for fd, _ in poller.poll(0 if busy else idle_timeout):
            if fd in kicks:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 8)
                continue
            if fd != ctrl.fileno():
                continue  # the device's own fd: ``group_poll`` reads it
            message = ctrl.recv(64)
            if not message or STOP in message:
                if message:
                    counters = json.dumps({
                        name: value - counters_before.get(name, 0)
                        for name, value in _counters(device).items()
                    }).encode()
                    ctrl.sendall(_REPLY_HEAD.pack(len(served), len(counters)) + b"".join(
                        _QUEUE_REPLY.pack(m.queue.index, m.queue.last_avail_idx,
                                          m.queue.used_idx, m.queue.broken,
                                          m.queue.failed_chains, m.interrupts)
                        for m in served) + counters)
                return 0


def _counters(device: object) -> dict[str, int]:
    """A device's counters: the int items of its ``stats`` (a dict or a dataclass)."""
    stats = getattr(device, "stats", None)
    if isinstance(stats, dict):
        items = list(stats.items())
    elif dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        items = [(f.name, getattr(stats, f.name)) for f in dataclasses.fields(stats)]
    else:
        return {}
    return {k: v for k, v in items if isinstance(k, str) and isinstance(v, int)}


def _add_counters(device: object, counters: dict[str, int]) -> None:
    """Add what a queue process counted to the device's own ``stats``."""
    stats = getattr(device, "stats", None)
    known = _counters(device)
    for name, value in counters.items():
        if isinstance(stats, dict):
            stats[name] = stats.get(name, 0) + value
        elif name in known:
            setattr(stats, name, known[name] + value)


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
