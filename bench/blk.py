"""virtio-blk over vhost-user: outboard against qemu-storage-daemon, without a VM.

    python -m bench.blk                 # host level: 24 runs of 3.5 s, 2 to 3 minutes
    python -m bench.blk --quick         # a smoke run
    python -m bench.blk --realtime --rounds 3 --guest   # what bench/README.md shows
    python -m bench.blk --socket PATH --backend-pid PID   # any running back-end

For every workload and queue depth each back-end is started afresh on its own
copy of one RAM-backed image, pinned to one core, while this process (the
front-end) runs pinned to the other; the two back-ends alternate. See
bench/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

import trio

from outboard.backend.virtio import Feature, bit
from outboard.testing import GuestRam, VhostUserDriver, VhostUserFrontend
from outboard.testing.vhost_user import FrontendError
from outboard.transports.vhost_user.wire import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature

from .procs import (
    BACKENDS,
    REPO,
    BackendProcess,
    CpuSnapshot,
    Usage,
    make_image,
    wait_for_quiet,
    wakeup_floor,
)
from .ring import BLK_T_IN, BLK_T_OUT, SECTOR, BlkRing, PhaseResult

__all__ = ["WORKLOADS", "RunResult", "Workload", "main"]

# virtio-blk feature bits the benchmark driver accepts
BLK_F_SIZE_MAX, BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH = 1, 2, 6, 9

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True)
class Workload:
    name: str
    kind: int
    block_size: int
    random: bool


WORKLOADS: dict[str, Workload] = {
    "randread-4k": Workload("randread-4k", BLK_T_IN, 4 * KIB, True),
    "randwrite-4k": Workload("randwrite-4k", BLK_T_OUT, 4 * KIB, True),
    "seqread-128k": Workload("seqread-128k", BLK_T_IN, 128 * KIB, False),
    "seqwrite-128k": Workload("seqwrite-128k", BLK_T_OUT, 128 * KIB, False),
}


@dataclass
class RunResult:
    backend: str
    workload: str
    qd: int
    phase: PhaseResult
    usage: Usage
    features: int = 0
    attempts: int = 1
    flagged: str = ""  # why the run is not trustworthy ("" if it is)
    starved_runs: list[float] = field(default_factory=list)
    #: percentiles known from elsewhere (fio), in microseconds
    percentiles: dict[int, float] = field(default_factory=dict)
    round: int = 0
    #: over several rounds: (max - min) / median of the IOPS, how many, how many flagged
    spread: float | None = None
    rounds: int = 1
    rounds_flagged: int = 0

    @property
    def iops(self) -> float:
        return self.phase.completed / self.phase.seconds

    @property
    def mbps(self) -> float:
        return self.phase.bytes / self.phase.seconds / 1e6

    def percentile(self, p: int) -> float:
        if p in self.percentiles:
            return self.percentiles[p]
        lat = self.phase.latencies_ns
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] / 1e3

    def cpu_per_request_us(self, seconds_share: float) -> float:
        if not self.phase.completed:
            return float("nan")
        return seconds_share * self.usage.wall / self.phase.completed * 1e6

    def as_dict(self) -> dict[str, object]:
        u = self.usage
        n = self.phase.completed or 1
        return {
            "workload": self.workload, "qd": self.qd, "backend": self.backend,
            "iops": self.iops, "mb_per_s": self.mbps,
            "p50_us": self.percentile(50), "p99_us": self.percentile(99),
            "completed": self.phase.completed, "errors": self.phase.errors,
            "seconds": self.phase.seconds, "frontend_cpu": u.frontend, "backend_cpu": u.backend,
            "frontend_starved": u.frontend_starved, "backend_starved": u.backend_starved,
            "frontend_run_delay": u.frontend_delay, "backend_run_delay": u.backend_delay,
            "other_on_frontend_core": u.other_fe_core, "other_on_backend_core": u.other_be_core,
            "steal": u.steal,
            "kicks_per_request": self.phase.kicks / n, "sleeps_per_request": self.phase.sleeps / n,
            "requests_per_batch": n / (self.phase.batches or 1),
            "attempts": self.attempts, "flagged": self.flagged, "round": self.round,
            "spread": self.spread, "rounds": self.rounds,
        }

    @property
    def failed(self) -> bool:
        return self.phase.errors > 0 or self.phase.completed == 0


# --------------------------------------------------------------------------- one run


class _Watchdog:
    """SIGALRM after ``seconds``: a back-end that stops answering cannot hang us in a
    blocking read of the call eventfd."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def fire(signum: int, frame: FrameType | None) -> None:
            raise TimeoutError("the back-end stopped answering")

        self._old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


async def _connect(path: str, timeout: float = 10.0) -> VhostUserFrontend:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await VhostUserFrontend.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            await trio.sleep(0.01)


def wanted_features(event_idx: bool) -> int:
    want = (bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(BLK_F_SIZE_MAX) | bit(BLK_F_SEG_MAX)
            | bit(BLK_F_BLK_SIZE) | bit(BLK_F_FLUSH))
    if event_idx:
        want |= bit(Feature.RING_EVENT_IDX)
    return want


def make_sectors(workload: Workload, capacity: int, seed: int) -> list[int]:
    """The sector of every request, in order (the ring reuses the list round and round)."""
    blocks = capacity * SECTOR // workload.block_size
    per_block = workload.block_size // SECTOR
    if blocks < 1:
        raise ValueError("the disk is smaller than one block")
    if workload.random:
        rng = random.Random(seed)
        return [rng.randrange(blocks) * per_block for _ in range(1 << 17)]
    return [i * per_block for i in range(blocks)]


@contextlib.asynccontextmanager
async def open_blk_driver(socket_path: str, ram_size: int, queue_sizes: Sequence[int], *,
                          event_idx: bool = True) -> AsyncIterator[VhostUserDriver]:
    """Connect to a vhost-user-blk back-end, take the benchmark's features (indirect
    descriptors required), start the queues; stop them again on the way out."""
    fe = await _connect(socket_path)
    ram = GuestRam((ram_size + MIB - 1) // MIB * MIB)
    driver = VhostUserDriver(fe, ram)
    try:
        features = await driver.negotiate(wanted_features(event_idx))
        if not features >> Feature.RING_INDIRECT_DESC & 1:
            raise FrontendError("the back-end does not offer indirect descriptors")
        await driver.start(queue_sizes)
        yield driver
        with trio.fail_after(10):
            await driver.stop()
    finally:
        driver.close()
        await fe.aclose()
        ram.close()


async def _session(args: argparse.Namespace, socket_path: str, backend_pid: int | None,
                   workload: Workload, qd: int, capacity: int) -> RunResult:
    ram_size = 2 * MIB + qd * (workload.block_size + 4 * KIB)
    async with open_blk_driver(socket_path, ram_size, [args.queue_size],
                               event_idx=not args.no_event_idx) as driver:
        features = driver.features
        fe = driver.frontend
        if fe.protocol_features >> ProtocolFeature.CONFIG & 1:
            config = await fe.get_config(0, 8)
            capacity = int.from_bytes(config, "little")
        ring = BlkRing(driver, qd, workload.block_size)
        with _Watchdog(30):
            problem = ring.roundtrip(capacity - 8)
        if problem:
            raise FrontendError(problem)
        ring.prepare(workload.kind, workload.block_size,
                     make_sectors(workload, capacity, args.seed))
        spin_ns = int(args.spin_us * 1000)
        with _Watchdog(args.warmup + args.duration + 30):
            ring.run(args.warmup, qd, spin_ns=spin_ns, record_latency=False)
            before = CpuSnapshot.take(backend_pid)
            phase = ring.run(args.duration, qd, spin_ns=spin_ns)
            after = CpuSnapshot.take(backend_pid)
            ring.drain()
    phase.latencies_ns.sort()
    usage = Usage.between(before, after, args.fe_core, args.be_core if backend_pid else None,
                          fe_realtime=bool(args.realtime), be_realtime=bool(args.realtime))
    return RunResult(backend="", workload=workload.name, qd=qd, phase=phase, usage=usage,
                     features=features)


def judge(result: RunResult, args: argparse.Namespace) -> str:
    """Why a run cannot be trusted, or ""."""
    why = []
    if result.phase.errors:
        why.append(f"{result.phase.errors} requests failed")
    if result.phase.completed == 0:
        why.append("nothing completed")
    u = result.usage
    if u.starved > args.max_starved:
        side = "front-end" if u.frontend_starved >= u.backend_starved else "back-end"
        why.append(f"{side} starved {u.starved:.0%}")
    return "; ".join(why)


def run_one(args: argparse.Namespace, name: str, workload: Workload, qd: int,
            workdir: str, image: str | None, capacity: int) -> RunResult:
    """Start the back-end ``name`` (unless it is external), measure, stop it."""
    best: RunResult | None = None
    starved: list[float] = []
    attempts = 0
    for _ in range(args.retries + 1):
        attempts += 1
        if args.wait_quiet > 0 and not args.realtime:
            wait_for_quiet(args.wait_quiet, {args.fe_core, args.be_core})
        if name == "external":
            res = trio.run(_session, args, args.socket, args.backend_pid, workload, qd, capacity)
        else:
            backend = BACKENDS[name]
            sock = os.path.join(workdir, f"{name}.sock")
            assert image is not None
            argv = backend.command(sock, image, args.queue_size)
            log_path = os.path.join(workdir, f"{name}.log")
            with BackendProcess(argv, sock, {args.be_core}, log_path=log_path,
                                realtime=args.realtime) as proc:
                try:
                    res = trio.run(_session, args, sock, proc.pid, workload, qd, capacity)
                except Exception as exc:
                    tail = _tail(log_path)
                    raise RuntimeError(f"{name} {workload.name} QD{qd}: {exc!r}{tail}") from exc
        res.backend = name
        res.flagged = judge(res, args)
        starved.append(res.usage.starved)
        if best is None or res.usage.starved < best.usage.starved:
            best = res
        if not res.flagged or res.failed:
            best = res
            break
    assert best is not None
    best.attempts = attempts
    best.starved_runs = starved
    return best


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return ("\n--- back-end log ---\n" + text[-2000:]) if text else ""


# --------------------------------------------------------------------------- reporting


def _progress(res: RunResult) -> None:
    print(f"  {res.workload:13} QD{res.qd:<3} {res.backend:8} {res.iops:>9,.0f} IOPS  "
          f"p50 {res.percentile(50):6.0f} us  FE {res.usage.frontend:4.0%}  "
          f"BE {res.usage.backend:4.0%}  starved {res.usage.starved:4.0%}"
          f"{'  ' + res.flagged if res.flagged else ''}", file=sys.stderr)


def summarize(runs: Sequence[RunResult]) -> list[RunResult]:
    """One row per workload, depth and back-end: the run with the median IOPS (of the
    trustworthy runs if there are any), with the spread of all its rounds."""
    groups: dict[tuple[str, int, str], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.qd, r.backend), []).append(r)
    out = []
    for group in groups.values():
        if any(r.failed for r in group):
            out.append(next(r for r in group if r.failed))
            continue
        good = [r for r in group if not r.flagged] or list(group)
        good.sort(key=lambda r: r.iops)
        median = good[(len(good) - 1) // 2]
        if len(group) > 1 and median.iops:
            iops = [r.iops for r in group]
            median.spread = (max(iops) - min(iops)) / median.iops
            median.rounds = len(group)
            median.rounds_flagged = sum(1 for r in group if r.flagged)
        out.append(median)
    return out


def machine_info() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qsd = "not installed"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                             text=True, check=True).stdout.splitlines()[0]
    tree = "?"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        def git(*argv: str) -> str:
            return subprocess.run(["git", "--no-optional-locks", *argv], capture_output=True,
                                  text=True, check=True, cwd=REPO).stdout.strip()
        tree = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            tree += " with local changes"
    return [
        f"date:    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"tree:    outboard {tree}",
        f"machine: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}",
        f"qsd:     {qsd}",
    ]


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)  # NaN -> "-"


HEADER = ("workload", "QD", "back-end", "IOPS", "MB/s", "p50 us", "p99 us",
          "FE CPU%", "BE CPU%", "FE us/req", "BE us/req", "starved%", "vs qsd", "note")


def table(results: Sequence[RunResult], *, baseline: str = "qsd",
          header: Sequence[str] = HEADER) -> str:
    spread = any(r.spread is not None for r in results)
    if spread:
        header = [*header[:4], "spread", *header[4:]]
    rows: list[list[str]] = [list(header)]
    by_key = {(r.workload, r.qd, r.backend): r for r in results}
    for r in results:
        base = by_key.get((r.workload, r.qd, baseline))
        ratio = ""
        if base is not None and r.backend != baseline and not base.failed and base.iops:
            ratio = f"{r.iops / base.iops:.2f}x"
        note = "FAILED: " + r.flagged if r.failed else (f"! {r.flagged}" if r.flagged else "")
        if r.attempts > 1:
            note = (note + " " if note else "") + f"(try {r.attempts})"
        if r.rounds_flagged:
            note = (note + " " if note else "") + f"({r.rounds_flagged}/{r.rounds} rounds flagged)"
        extra = []
        if spread:
            extra = [f"{r.spread:.0%}" if r.spread is not None else ""]
        rows.append([
            r.workload, str(r.qd), r.backend,
            _fmt(r.iops, ",.0f"), *extra, _fmt(r.mbps, ".1f"),
            _fmt(r.percentile(50), ".0f"), _fmt(r.percentile(99), ".0f"),
            _fmt(r.usage.frontend * 100, ".0f"), _fmt(r.usage.backend * 100, ".0f"),
            _fmt(r.cpu_per_request_us(r.usage.frontend), ".1f"),
            _fmt(r.cpu_per_request_us(r.usage.backend), ".1f"),
            _fmt(r.usage.starved * 100, ".0f"), ratio, note,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 2, len(header) - 1}
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"k": KIB, "m": MIB, "g": GIB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.blk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per run (3)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring (0.5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run everything this many times (interleaved) and show the median "
                        "run with the spread of the IOPS (1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.5 s runs, 0.1 s warm-up, a 128 MiB image, no retries")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument("--qd", default="1,32,128", help="queue depths (1,32,128)")
    p.add_argument("--backends", default="outboard,qsd",
                   help=f"comma-separated, from {', '.join(BACKENDS)}")
    p.add_argument("--queue-size", type=int, default=256, help="ring size (256)")
    p.add_argument("--image-size", default="1G", help="size of the test image (1G)")
    p.add_argument("--image-dir", default="/dev/shm", help="where the images live (/dev/shm)")
    p.add_argument("--no-event-idx", action="store_true",
                   help="do not negotiate VIRTIO_RING_F_EVENT_IDX (flags-based suppression)")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="busy-poll the used index this long before sleeping on the call "
                        "eventfd (0: sleep at once)")
    p.add_argument("--fe-core", type=int, default=0, help="core of the front-end (0)")
    p.add_argument("--be-core", type=int, default=1, help="core of the back-end (1)")
    p.add_argument("--max-starved", type=float, default=0.10,
                   help="flag a run when either side lost more than this share of the CPU "
                        "it needed to other processes (0.10)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-run a flagged run up to this many times (2)")
    p.add_argument("--wait-quiet", type=float, default=10.0, metavar="SECONDS",
                   help="before each run, wait up to this long for both cores to be "
                        "nearly idle (10; 0: do not wait; not with --realtime)")
    p.add_argument("--realtime", type=int, nargs="?", const=10, default=0, metavar="PRIO",
                   help="run the front-end and the back-ends with SCHED_FIFO priority PRIO "
                        "(10 if not given), so other processes on a shared machine cannot "
                        "preempt them (default: normal scheduling)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    p.add_argument("--socket", metavar="PATH",
                   help="drive an already running back-end at PATH instead")
    p.add_argument("--backend-pid", type=int, metavar="PID",
                   help="with --socket: the back-end's pid, for its CPU use")
    p.add_argument("--json", metavar="FILE", help="also write every result to FILE as JSON")
    p.add_argument("--guest", action="store_true",
                   help="then run fio in a guest for both back-ends (bench.blk_guest)")
    p.add_argument("--guest-runtime", type=float, default=8.0,
                   help="seconds per fio job in the guest (8)")
    return p


@contextlib.contextmanager
def _workdir(base: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="outboard-bench-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _pin(core: int) -> None:
    try:
        os.sched_setaffinity(0, {core})
    except OSError as exc:
        print(f"warning: cannot pin to core {core}: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.retries, args.wait_quiet = 0.5, 0.1, 0, 0.0
        if args.image_size == "1G":
            args.image_size = "128M"
    image_size = parse_size(args.image_size)
    unknown = [w for w in args.workloads.split(",") if w and w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload {unknown[0]!r} (known: {', '.join(WORKLOADS)})")
    workloads = [WORKLOADS[w] for w in args.workloads.split(",") if w]
    qds = [int(q) for q in args.qd.split(",") if q]
    if max(qds) > args.queue_size:
        raise SystemExit(f"queue depth {max(qds)} > queue size {args.queue_size}")
    if args.socket:
        names = ["external"]
    else:
        names = [n for n in args.backends.split(",") if n]
        for n in names:
            if n not in BACKENDS:
                raise SystemExit(f"unknown back-end {n!r}")
            why = BACKENDS[n].available()
            if why:
                raise SystemExit(f"{n}: {why}")
    if (os.cpu_count() or 1) < 2:
        print("warning: one CPU: front-end and back-end share it", file=sys.stderr)
        args.be_core = args.fe_core
    _pin(args.fe_core)
    if args.realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime))

    info = machine_info()
    if (os.cpu_count() or 1) >= 2:
        rtt, fe_us, be_us = wakeup_floor(args.fe_core, args.be_core, realtime=args.realtime)
        info.append(f"floor:   eventfd ping-pong core {args.fe_core} <-> {args.be_core}: "
                    f"{rtt:.1f} us round trip, CPU {fe_us:.1f} + {be_us:.1f} us per round trip")
    for line in info:
        print(line, file=sys.stderr)
    results: list[RunResult] = []
    started = time.monotonic()
    with _workdir(args.image_dir) as workdir:
        images: dict[str, str] = {}
        if not args.socket:
            print(f"making a {image_size / MIB:.0f} MiB image in {args.image_dir} ...",
                  file=sys.stderr)
            first = os.path.join(workdir, f"{names[0]}.img")
            make_image(first, image_size)
            images[names[0]] = first
            for other in names[1:]:
                images[other] = os.path.join(workdir, f"{other}.img")
                shutil.copyfile(first, images[other])
        capacity = image_size // SECTOR
        turn = 0
        for rnd in range(args.rounds):
            for workload in workloads:
                for qd in qds:
                    order = names if turn % 2 == 0 else names[::-1]
                    turn += 1
                    for name in order:
                        res = run_one(args, name, workload, qd, workdir, images.get(name),
                                      capacity)
                        res.round = rnd
                        results.append(res)
                        _progress(res)
    all_runs = results
    results = summarize(results)
    # rows in a fixed order: workload, QD, then back-ends as listed
    rank = {name: i for i, name in enumerate(names)}
    results.sort(key=lambda r: (workloads.index(WORKLOADS[r.workload]), qds.index(r.qd),
                                rank[r.backend]))
    event_idx = bool(results and results[0].features >> Feature.RING_EVENT_IDX & 1)
    print("\n".join(info))
    print(f"host-level: {args.duration:g} s per run after {args.warmup:g} s warm-up, "
          f"{image_size / MIB:.0f} MiB image in {args.image_dir}, queue size {args.queue_size}, "
          f"indirect descriptors, event-idx {'on' if event_idx else 'off'}, "
          f"front-end on core {args.fe_core}, back-end on core {args.be_core}"
          f"{f', both SCHED_FIFO {args.realtime}' if args.realtime else ''}"
          f"{f'; median of {args.rounds} rounds' if args.rounds > 1 else ''} "
          f"({time.monotonic() - started:.0f} s)")
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": [r.as_dict() for r in results],
                       "runs": [r.as_dict() for r in all_runs]}, f, indent=1)
    failed = any(r.failed for r in results)
    if args.guest:
        from . import blk_guest
        if args.realtime:  # a TCG vCPU thread must not run real-time
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        print()
        sys.stdout.flush()
        code = blk_guest.main(["--runtime", str(args.guest_runtime),
                               "--image-size", args.image_size, "--image-dir", args.image_dir,
                               "--no-machine-info"]
                              + (["--quick"] if args.quick else [])
                              + ([f"--realtime={args.realtime}"] if args.realtime else []))
        failed = failed or code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
