"""virtio-net: outboard against DPDK's own vhost-user back-end, both driven by
DPDK testpmd's virtio-user (no VM, no hugepages).

    python -m bench.net                  # 64 B and 1518 B, three modes, 2 rounds
    python -m bench.net --quick          # one round, shorter windows
    python -m bench.net --profile        # also profile outboard per mode (py-spy if
                                         # installed, else cProfile)
    python -m bench.net --sizes 64 --modes txonly --rounds 3 --seconds 10

Each measurement starts a back-end pinned to one core and a virtio-user
testpmd pinned to the other, waits ``--warmup`` seconds, then reads testpmd's
per-second throughput for ``--seconds`` seconds (the median is reported) and
the CPU time each side got. The back-ends alternate, in a different order each
round. The modes, as the virtio-user side sees them:

  txonly  testpmd sends. outboard: ``--generate`` (drops what is sent);
          reference: vhost testpmd in rxonly mode.
  rxonly  testpmd receives. outboard: ``--generate SIZE`` fills every receive
          buffer with a frame; reference: vhost testpmd in txonly mode.
  fwd     testpmd sends 512 frames, then forwards what it receives back (io);
          outboard: ``--loopback``; reference: vhost testpmd forwarding (io).
          Each frame crosses the back-end twice per turn; the rate is what the
          virtio side receives.

A run where a side did not have its core (the machine is shared) is marked,
left out of the medians and tried again (``--attempts``). See bench/NET.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MODES", "Measurement", "main"]

REPO = Path(__file__).resolve().parent.parent
TESTPMD = "dpdk-testpmd"
MODES = ("txonly", "rxonly", "fwd")
BACKENDS = ("outboard", "dpdk-vhost")
#: testpmd's busy-polling lcore must get this share of its core...
MIN_CPU_SHARE = 0.8
#: ...and neither side may wait for a CPU more than this share of the window
MAX_WAITED = 0.05
FWD_BURSTS = 16


# --------------------------------------------------------------------------- CPU accounting


def thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread of ``pid``: seconds on a CPU and seconds runnable but waiting
    for one (``/proc/PID/task/TID/schedstat``)."""
    out: dict[str, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                oncpu, waiting = f.read().split()[:2]
                out[task] = (int(oncpu) / 1e9, int(waiting) / 1e9)
    return out


@dataclass
class CpuWindow:
    """What one process got from the scheduler over a window: the share of a
    core its busiest thread ran (a DPDK forwarding lcore, outboard's thread),
    and the share of the window that thread waited for a CPU while runnable."""

    pid: int
    start: dict[str, tuple[float, float]] = field(default_factory=dict)
    start_wall: float = 0.0
    share: float = 0.0
    waited: float = 0.0

    def begin(self) -> None:
        self.start = thread_times(self.pid)
        self.start_wall = time.monotonic()

    def end(self) -> None:
        wall = time.monotonic() - self.start_wall
        best = (0.0, 0.0)
        for task, (oncpu, waiting) in thread_times(self.pid).items():
            before = self.start.get(task, (0.0, 0.0))
            ran = (oncpu - before[0], waiting - before[1])
            best = max(best, ran)
        self.share, self.waited = best[0] / wall, best[1] / wall


# --------------------------------------------------------------------------- processes


def _cores() -> tuple[int, int]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("bench.net needs two cores (one per side)")
    return cores[-2], cores[-1]


def _eal(core: int, prefix: str, vdev: str) -> list[str]:
    return [TESTPMD, "--no-huge", "-m", "512", "--no-shconf", "--no-pci",
            f"--file-prefix={prefix}", "--lcores", f"0@{core},1@{core}", "--vdev", vdev]


def _testpmd_app(mode: str, size: int) -> list[str]:
    """testpmd's options; the statistics period also keeps a non-interactive
    testpmd running until it is signalled (else it exits at the end of stdin)."""
    forward = {"txonly": "txonly", "rxonly": "rxonly", "fwd": "io"}[mode]
    return ["--", "--total-num-mbufs=32768", f"--forward-mode={forward}", "--nb-cores=1",
            f"--txpkts={size}", "--burst=32", "--no-flush-rx", "--stats-period=1"]


class Proc:
    """A benchmark process: output collected by a thread, stopped with SIGINT."""

    def __init__(self, argv: Sequence[str], *, core: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=REPO, env=env, start_new_session=True)
        if core is not None:
            os.sched_setaffinity(self.proc.pid, {core})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait_for_socket(path: Path, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.argv[0]} did not create {path}:\n{proc.output[-2000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def backend(kind: str, mode: str, size: int, socket_path: Path, core: int,
            profile: Path | None) -> Iterator[Proc]:
    if kind == "outboard":
        port = {"txonly": ["--generate", str(size)], "rxonly": ["--generate", str(size)],
                "fwd": ["--loopback"]}[mode]
        python = [sys.executable]
        if profile is not None:
            python += ["-m", "cProfile", "-o", str(profile)]
        argv = [*python, "-m", "outboard", "net", *port, "--socket-path", str(socket_path)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = Proc(argv, core=core, env=env)
    else:
        reverse = {"txonly": "rxonly", "rxonly": "txonly", "fwd": "fwd"}[mode]
        argv = [*_eal(core, f"obvh{os.getpid()}", f"net_vhost0,iface={socket_path},queues=1"),
                *_testpmd_app(reverse, size)]
        proc = Proc(argv)
    try:
        _wait_for_socket(socket_path, proc)
        yield proc
    finally:
        # outboard ends on SIGINT like on SIGTERM, and writes its profile then.
        proc.stop()


# --------------------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    backend: str
    mode: str
    size: int
    mpps: float
    samples: list[float]
    backend_cpu: float
    driver_cpu: float
    backend_waited: float
    driver_waited: float
    note: str = ""
    #: outboard's transmitted packets per look at the transmit ring that sent
    #: some, over the whole run (from its closing counters); None if unknown
    per_burst: float | None = None

    @property
    def fair(self) -> bool:
        """Both sides had their core: testpmd's poller ran, nobody queued for a CPU.
        (outboard may idle by itself, waiting for work: its share is reported,
        its waiting decides.)"""
        return (not self.note and self.driver_cpu >= MIN_CPU_SHARE
                and self.backend_waited <= MAX_WAITED and self.driver_waited <= MAX_WAITED)


_PPS = re.compile(r"(Rx|Tx)-pps:\s+(\d+)")
_TX_COUNTERS = re.compile(r"tx_packets (\d+),.* tx_bursts (\d+)")


def _per_burst(output: str) -> float | None:
    """Packets per transmit burst from outboard's last counters line (logged
    when the driver goes away)."""
    found = _TX_COUNTERS.findall(output)
    if not found:
        return None
    packets, bursts = map(int, found[-1])
    return packets / bursts if bursts else None


def _samples(lines: Sequence[str], key: str) -> list[int]:
    return [int(m.group(2)) for line in lines for m in [_PPS.search(line)]
            if m is not None and m.group(1) == key]


def measure(kind: str, mode: str, size: int, *, warmup: float, seconds: float,
            workdir: Path, profile: Path | None = None,
            on_window: Callable[[int], object] | None = None) -> Measurement:
    back_core, front_core = _cores()
    socket_path = workdir / f"{kind}.sock"
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    vdev = f"net_virtio_user0,path={socket_path},queues=1,queue_size=1024"
    front_argv = [*_eal(front_core, f"obvu{os.getpid()}", vdev),
                  *_testpmd_app(mode, size)]
    if mode == "fwd":
        commands = workdir / "fwd.cmds"
        commands.write_text(f"start tx_first {FWD_BURSTS}\n")
        front_argv.append(f"--cmdline-file={commands}")
    key = "Tx" if mode == "txonly" else "Rx"
    with backend(kind, mode, size, socket_path, back_core, profile) as back:
        front = Proc(front_argv)
        try:
            time.sleep(warmup)
            cpu_back, cpu_front = CpuWindow(back.pid), CpuWindow(front.pid)
            cpu_back.begin()
            cpu_front.begin()
            if on_window is not None:
                on_window(back.pid)
            before = len(front.lines)
            time.sleep(seconds)
            cpu_back.end()
            cpu_front.end()
            window = front.lines[before:]
        finally:
            front.stop()
    samples = [s / 1e6 for s in _samples(window, key)]
    note = "" if samples else "no throughput lines from testpmd"
    if samples and not any(samples):
        # Nothing moved in the whole window: a stall, reported as one (with both
        # sides' output), never a measurement.
        note = "stalled: no frames in the window"
    if note:
        print(front.output[-3000:], file=sys.stderr)
        print(back.output[-3000:], file=sys.stderr)
    return Measurement(kind, mode, size, statistics.median(samples) if samples else 0.0,
                       samples, cpu_back.share, cpu_front.share, cpu_back.waited,
                       cpu_front.waited, note,
                       _per_burst(back.output) if kind == "outboard" else None)


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    runs: list[Measurement] = field(default_factory=list)

    def median(self, kind: str, mode: str, size: int) -> tuple[float | None, int, int]:
        fair = [m.mpps for m in self.runs
                if (m.backend, m.mode, m.size) == (kind, mode, size) and m.fair]
        every = [m for m in self.runs if (m.backend, m.mode, m.size) == (kind, mode, size)]
        return (statistics.median(fair) if fair else None), len(fair), len(every)


def _mpps(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def table(results: Results, sizes: Sequence[int], modes: Sequence[str]) -> str:
    head = (f"{'mode':<7} {'size':>5}  {'outboard Mpps':>13}  {'DPDK vhost Mpps':>15}  "
            f"{'ratio':>7}  {'runs kept':>9}")
    out = [head, "-" * len(head)]
    for mode in modes:
        for size in sizes:
            ours, n1, t1 = results.median("outboard", mode, size)
            ref, n2, t2 = results.median("dpdk-vhost", mode, size)
            ratio = f"{ours / ref:7.1%}" if ours is not None and ref else "      -"
            out.append(f"{mode:<7} {size:>5}  {_mpps(ours):>13}  {_mpps(ref):>15}  {ratio}  "
                       f"{n1}/{t1}, {n2}/{t2}")
    return "\n".join(out)


def profile_report(path: Path, top: int = 25) -> str:
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    return stream.getvalue()


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def spy_report(raw: Path, top: int = 20) -> str:
    """Self and total samples per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = [re.sub(r" \((?:.*/)?([^/]+):\d+\)$", r" (\1)", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            total[name] = total.get(name, 0) + count
    lines = [f"{samples} samples; self% total%  function (file)"]
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {count / samples:6.1%} {total[name] / samples:6.1%}  {name}")
    return "\n".join(lines)


def spy_measure(mode: str, size: int, *, warmup: float, seconds: float,
                workdir: Path) -> tuple[Measurement, str]:
    """One outboard run with py-spy sampling it (without stopping it) in the window."""
    raw = workdir / f"{mode}-{size}.spy"
    spy = py_spy()
    assert spy is not None
    result: dict[str, Measurement] = {}

    def run() -> None:
        result["m"] = measure("outboard", mode, size, warmup=warmup, seconds=seconds,
                              workdir=workdir, on_window=lambda pid: spy_proc.append(
                                  subprocess.Popen([spy, "record", "--nonblocking", "-r", "250",
                                                    "-f", "raw", "-o", str(raw), "-d",
                                                    str(int(seconds)), "-p", str(pid)],
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL)))

    spy_proc: list[subprocess.Popen[bytes]] = []
    run()
    for proc in spy_proc:
        proc.wait(30)
    report = spy_report(raw) if raw.exists() else "(py-spy wrote nothing)"
    return result["m"], report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.net", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1518])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attempts", type=int, default=3,
                        help="runs of one back-end, mode and size until one is fair")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true", help="one round, 2 s + 4 s windows")
    parser.add_argument("--profile", action="store_true",
                        help="run outboard under cProfile once per mode and size")
    parser.add_argument("--only", choices=BACKENDS, help="measure one back-end")
    args = parser.parse_args(argv)
    if shutil.which(TESTPMD) is None:
        print(f"{TESTPMD} not found (scripts/install-test-deps installs DPDK)", file=sys.stderr)
        return 2
    if args.quick:
        args.rounds, args.warmup, args.seconds = 1, 2.0, 4.0
    kinds = [args.only] if args.only else list(BACKENDS)
    back_core, front_core = _cores()
    print(f"back-end on core {back_core}, testpmd (virtio-user) on core {front_core}; "
          f"{args.warmup:g} s warm-up, {args.seconds:g} s measured per run")
    results = Results()
    with tempfile.TemporaryDirectory(prefix="outboard-bench-net-") as tmp:
        workdir = Path(tmp)
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for mode in args.modes:
                for size in args.sizes:
                    for kind in order:
                        for _ in range(args.attempts):
                            m = measure(kind, mode, size, warmup=args.warmup,
                                        seconds=args.seconds, workdir=workdir)
                            results.runs.append(m)
                            flag = "" if m.fair else "  (left out: " + (
                                m.note or "a side did not have its core") + ")"
                            if m.per_burst is not None:
                                flag = f", {m.per_burst:.0f} packets per tx burst{flag}"
                            print(f"round {rnd + 1} {mode:<6} {size:>4} B {kind:<10} "
                                  f"{m.mpps:7.3f} Mpps  back-end ran {m.backend_cpu:4.0%} "
                                  f"waited {m.backend_waited:4.0%}, testpmd ran "
                                  f"{m.driver_cpu:4.0%} waited {m.driver_waited:4.0%}{flag}",
                                  flush=True)
                            if m.fair:
                                break
        print()
        print(table(results, args.sizes, args.modes))
        if args.profile:
            for mode in args.modes:
                for size in args.sizes:
                    if py_spy() is not None:
                        m, report = spy_measure(mode, size, warmup=args.warmup,
                                                seconds=args.seconds, workdir=workdir)
                        print(f"\n=== py-spy of outboard, {mode} {size} B "
                              f"({m.mpps:.3f} Mpps while sampled) ===\n{report}")
                        continue
                    prof = workdir / f"{mode}-{size}.prof"
                    m = measure("outboard", mode, size, warmup=args.warmup,
                                seconds=args.seconds, workdir=workdir, profile=prof)
                    print(f"\n=== cProfile of outboard, {mode} {size} B "
                          f"({m.mpps:.3f} Mpps under the profiler) ===")
                    print(profile_report(prof) if prof.exists() else "(no profile written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
