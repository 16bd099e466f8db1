"""Back-end processes (pinned to a core) and CPU accounting from /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKENDS",
    "Backend",
    "CpuSnapshot",
    "Usage",
    "make_image",
    "process_cpu",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- /proc


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` (dead threads included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def family_cpu(pid: int) -> float:
    """``process_cpu`` of ``pid`` and of its live descendants (a back-end's queue
    processes)."""
    total = process_cpu(pid)
    for kid in children(pid):
        with contextlib.suppress(OSError):
            total += family_cpu(kid)
    return total


def family_run_delay(pid: int) -> float:
    """``run_delay`` of ``pid`` and of its live descendants."""
    return run_delay(pid) + sum(family_run_delay(kid) for kid in children(pid))


def process_threads(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[17])


def _oncpu(pid: int) -> float:
    """Seconds on a CPU of the main thread of ``pid``, to the nanosecond (schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def run_delay(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


def cpu_times() -> dict[int, tuple[float, float, float]]:
    """Per CPU, in seconds, from /proc/stat: busy (steal included), steal, and
    time in interrupts and softirqs."""
    out: dict[int, tuple[float, float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals]
            user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
            out[int(name[3:])] = ((user + nice + system + irq + softirq + steal) / CLK_TCK,
                                  steal / CLK_TCK, (irq + softirq) / CLK_TCK)
    return out


def wait_for_quiet(max_wait: float, cores: set[int], *, busy_limit: float = 0.10,
                   window: float = 0.5) -> float:
    """Wait (up to ``max_wait`` seconds) until ``cores`` were nearly idle for ``window``
    seconds; return the busiest core's load over the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        a = cpu_times()
        time.sleep(window)
        b = cpu_times()
        load = max(((b[c][0] - a[c][0]) / window for c in cores if c in a and c in b),
                   default=0.0)
        if load <= busy_limit or time.monotonic() >= deadline:
            return load


@dataclass
class CpuSnapshot:
    """Everything sampled at one instant of a run."""

    wall: float
    frontend: float  # our own process CPU seconds
    frontend_delay: float
    backend: float
    backend_delay: float
    cores: dict[int, tuple[float, float, float]]

    @classmethod
    def take(cls, backend_pid: int | None) -> CpuSnapshot:
        return cls(
            wall=time.perf_counter(),
            frontend=time.process_time(),
            frontend_delay=run_delay(os.getpid()),
            backend=family_cpu(backend_pid) if backend_pid else 0.0,
            backend_delay=family_run_delay(backend_pid) if backend_pid else 0.0,
            cores=cpu_times(),
        )


@dataclass
class Usage:
    """CPU use between two snapshots, as fractions of the wall time."""

    wall: float
    frontend: float
    backend: float
    frontend_delay: float
    backend_delay: float
    #: CPU time on the front-end's / back-end's core that was neither side's
    #: (other processes, interrupts, time stolen by the hypervisor; with
    #: real-time scheduling only steal)
    other_fe_core: float
    other_be_core: float
    steal: float

    @classmethod
    def between(cls, a: CpuSnapshot, b: CpuSnapshot, fe_core: int | None,
                be_core: int | None, *, fe_realtime: bool = False,
                be_realtime: bool = False) -> Usage:
        """``fe_realtime``, ``be_realtime``: that side ran SCHED_FIFO, so only the
        hypervisor (steal), interrupts and real-time throttling could take its core
        from it; of those only steal is counted (the interrupts on its core are
        mostly its own wake-ups, throttling needs more than 95% of the core)."""
        wall = b.wall - a.wall
        fe = b.frontend - a.frontend
        be = b.backend - a.backend

        def other(core: int | None, ours: float, realtime: bool) -> tuple[float, float]:
            if core is None or core not in a.cores or core not in b.cores:
                return 0.0, 0.0
            busy, steal, _irq = (y - x for x, y in zip(a.cores[core], b.cores[core], strict=True))
            if realtime:  # interrupts here are mostly our own wake-ups (IPIs)
                return steal / wall, steal / wall
            return max(0.0, busy - ours) / wall, steal / wall

        other_fe, steal_fe = other(fe_core, fe, fe_realtime)
        other_be, steal_be = other(be_core, be, be_realtime)
        return cls(
            wall=wall,
            frontend=fe / wall,
            backend=be / wall,
            frontend_delay=(b.frontend_delay - a.frontend_delay) / wall,
            backend_delay=(b.backend_delay - a.backend_delay) / wall,
            other_fe_core=other_fe,
            other_be_core=other_be,
            steal=max(steal_fe, steal_be),
        )

    @property
    def frontend_starved(self) -> float:
        return _starved(self.frontend, self.frontend_delay, self.other_fe_core)

    @property
    def backend_starved(self) -> float:
        return _starved(self.backend, self.backend_delay, self.other_be_core)

    @property
    def starved(self) -> float:
        """The larger share of the CPU a side needed that it did not get."""
        return max(self.frontend_starved, self.backend_starved)


def _starved(used: float, delay: float, other: float) -> float:
    """What a side lost to others, as a share of what it needed: its threads waited
    ``delay`` runnable while ``other`` went to something else on its core; it lost
    at most the smaller (its waits for its own threads are not a loss)."""
    lost = min(delay, other)
    need = used + lost
    return lost / need if need > 0 else 0.0


def wakeup_floor(fe_core: int, be_core: int, *, rounds: int = 5000,
                 realtime: int = 0) -> tuple[float, float, float]:
    """Ping-pong over two eventfds between a child on ``be_core`` and us on ``fe_core``:
    (round trip, our CPU per round trip, the child's CPU per round trip), in us.
    The least any vhost-user back-end pays per request when every request is a
    kick and an interrupt (queue depth 1)."""
    ping, pong = os.eventfd(0), os.eventfd(0)
    one = (1).to_bytes(8, "little")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.sched_setaffinity(0, {be_core})
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))
            for _ in range(rounds + 100):
                os.read(ping, 8)
                os.write(pong, one)
        finally:
            os._exit(0)
    try:
        for _ in range(100):
            os.write(ping, one)
            os.read(pong, 8)
        child0 = _oncpu(pid)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(rounds):
            os.write(ping, one)
            os.read(pong, 8)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        child = _oncpu(pid) - child0
    finally:
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)
    return wall / rounds * 1e6, cpu / rounds * 1e6, child / rounds * 1e6


# --------------------------------------------------------------------------- back-ends


@dataclass(frozen=True)
class Backend:
    """How to start one vhost-user-blk back-end on a socket path and an image."""

    name: str
    argv: tuple[str, ...]  # with {socket}, {image}, {queue_size} and {queues} placeholders

    def command(self, socket_path: str, image: str, queue_size: int,
                queues: int = 1) -> list[str]:
        return [a.format(socket=socket_path, image=image, queue_size=queue_size,
                         queues=queues) for a in self.argv]

    def available(self) -> str | None:
        """Why the back-end cannot run here, or None."""
        exe = self.argv[0]
        if os.sep in exe:
            return None if os.access(exe, os.X_OK) else f"{exe} is missing"
        return None if shutil.which(exe) else f"{exe} is not installed"


BACKENDS: dict[str, Backend] = {
    "outboard": Backend("outboard", (
        sys.executable, "-m", "outboard", "blk", "--socket-path", "{socket}",
        "--blk-file", "{image}", "--queue-size", "{queue_size}", "--num-queues", "{queues}")),
    # every queue served by a process of its own (no trio on the data path)
    "outboard-procs": Backend("outboard-procs", (
        sys.executable, "-m", "outboard", "blk", "--socket-path", "{socket}",
        "--blk-file", "{image}", "--queue-size", "{queue_size}", "--num-queues", "{queues}",
        "--queue-processes")),
    "qsd": Backend("qsd", (
        "qemu-storage-daemon",
        "--blockdev", "driver=file,node-name=file0,filename={image},cache.direct=off,"
                      "aio=threads,discard=unmap",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    "addr.path={socket},writable=on,num-queues={queues}")),
}


class BackendProcess:
    """A running back-end, pinned to ``cores``; stopped with SIGTERM on exit."""

    def __init__(self, argv: Sequence[str], socket_path: str, cores: set[int] | None,
                 *, log_path: str | None = None, ready_timeout: float = 15.0,
                 realtime: int = 0) -> None:
        self.argv = list(argv)
        self.realtime = realtime
        self.socket_path = socket_path
        self.cores = cores
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> BackendProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        cores = self.cores
        realtime = self.realtime

        def pin() -> None:  # in the child, before exec: every thread inherits it
            if cores:
                os.sched_setaffinity(0, cores)
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))

        log = open(self.log_path or os.devnull, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, preexec_fn=pin, cwd=REPO,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.ready_timeout
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode} "
                                   f"before listening{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.argv[0]} did not create {self.socket_path}")
            time.sleep(0.01)
        return self

    def _log_tail(self) -> str:
        if not self.log_path:
            return ""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n" + text[-2000:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


# --------------------------------------------------------------------------- images


def make_image(path: str, size: int) -> None:
    """A raw image of ``size`` bytes full of data (no holes: reads hit real pages)."""
    chunk = bytearray(os.urandom(4 << 20))
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(len(chunk), size - done)
            # Vary each chunk a little so no two are the same.
            chunk[:8] = done.to_bytes(8, "little")
            f.write(chunk[:n])
            done += n
