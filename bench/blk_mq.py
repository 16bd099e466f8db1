"""Multi-queue virtio-blk: does the total grow with the queues (and the cores)?

    python -m bench.blk_mq                      # 1 and 2 queues, three back-ends, 2 rounds
    python -m bench.blk_mq --queues 1,2,4 --qd 32 --duration 5

Each back-end serves N queues; the front-end drives every queue from a process
of its own (forked after the rings are set up, sharing the guest RAM memfd),
each keeping ``--qd`` 4 KiB random reads in flight with the same ring loop as
``bench.blk``. Nothing is pinned: the scheduler places every process on the
machine's cores. The back-ends:

  outboard        ``outboard blk --num-queues N``: every queue in one process
  outboard-procs  the same with ``--queue-processes``: a process per queue
  qsd             ``qemu-storage-daemon ... num-queues=N`` (one I/O thread)

The table gives the total IOPS, the back-end's CPU (all its processes and
threads; 100% is one core) and its CPU per request, and the front-end's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from outboard.testing.vhost_user import FrontendError

from .blk import (
    KIB,
    MIB,
    WORKLOADS,
    _workdir,
    machine_info,
    make_sectors,
    open_blk_driver,
    parse_size,
)
from .procs import BACKENDS, BackendProcess, family_cpu, make_image
from .ring import BLK_T_IN, SECTOR, BlkRing

NAMES = ("outboard", "outboard-procs", "qsd")


@dataclass
class MqResult:
    backend: str
    queues: int
    qd: int
    completed: int
    errors: int
    seconds: float
    be_cpu: float  # seconds
    fe_cpu: float  # seconds, all front-end processes
    p50_us: float

    @property
    def iops(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


def _child(ring: BlkRing, qd: int, sectors: list[int],
           warmup: float, duration: float, ready_w: int, go_r: int, out_w: int) -> None:
    ring.prepare(BLK_T_IN, 4 * KIB, sectors)
    ring.run(warmup, qd, record_latency=False)
    os.write(ready_w, b"R")
    os.read(go_r, 1)
    cpu = time.process_time()
    phase = ring.run(duration, qd)
    cpu = time.process_time() - cpu
    lat = sorted(phase.latencies_ns)
    p50 = lat[len(lat) // 2] / 1000 if lat else 0.0
    os.write(out_w, json.dumps({"completed": phase.completed, "errors": phase.errors,
                                "seconds": phase.seconds, "cpu": cpu,
                                "p50": p50}).encode() + b"\n")


async def session(args: argparse.Namespace, socket_path: str, backend_pid: int,
                  queues: int, capacity: int) -> MqResult:
    ram_size = 2 * MIB + queues * args.qd * 8 * KIB + queues * MIB
    async with open_blk_driver(socket_path, ram_size, [args.queue_size] * queues) as driver:
        # Every ring is laid out here, before the fork, so that each has RAM of its own.
        rings = [BlkRing(driver, args.qd, 4 * KIB, index=i) for i in range(queues)]
        for ring in rings:
            problem = ring.roundtrip(capacity - 8)
            if problem:
                raise FrontendError(problem)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        pids = []
        for index in range(queues):
            sectors = make_sectors(WORKLOADS["randread-4k"], capacity, args.seed + index)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _child(rings[index], args.qd, sectors, args.warmup, args.duration,
                           ready_w, go_r, out_w)
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        for _ in pids:
            await trio.lowlevel.wait_readable(ready_r)
            os.read(ready_r, 1)
        be_before = family_cpu(backend_pid)
        os.write(go_w, b"G" * len(pids))
        lines: list[dict[str, float]] = []
        buf = b""
        while len(lines) < len(pids):
            await trio.lowlevel.wait_readable(out_r)
            buf += os.read(out_r, 65536)
            *done, buf = buf.split(b"\n")
            lines += [json.loads(x) for x in done]
        be_after = family_cpu(backend_pid)
        for pid in pids:
            os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w, out_r, out_w):
            os.close(fd)
    seconds = statistics.mean(x["seconds"] for x in lines)
    return MqResult(backend="", queues=queues, qd=args.qd,
                    completed=int(sum(x["completed"] for x in lines)),
                    errors=int(sum(x["errors"] for x in lines)), seconds=seconds,
                    be_cpu=be_after - be_before, fe_cpu=sum(x["cpu"] for x in lines),
                    p50_us=statistics.median(x["p50"] for x in lines))


def table(results: Sequence[MqResult], names: Sequence[str]) -> str:
    rows = [f"{'back-end':<15} {'queues':>6} {'QD/queue':>8} {'IOPS':>9} {'per queue':>9} "
            f"{'p50 us':>7} {'BE CPU%':>7} {'BE us/req':>9} {'FE CPU%':>7} {'x 1 queue':>9}"]
    rows.append("-" * len(rows[0]))
    one: dict[str, float] = {}
    for r in sorted(results, key=lambda r: (names.index(r.backend), r.queues)):
        if r.queues == 1:
            one[r.backend] = r.iops
        base = one.get(r.backend)
        scale = f"{r.iops / base:.2f}x" if base else "-"
        be_us = r.be_cpu / r.completed * 1e6 if r.completed else 0.0
        rows.append(f"{r.backend:<15} {r.queues:>6} {r.qd:>8} {r.iops:>9,.0f} "
                    f"{r.iops / r.queues:>9,.0f} {r.p50_us:>7.0f} "
                    f"{r.be_cpu / r.seconds * 100:>7.0f} {be_us:>9.1f} "
                    f"{r.fe_cpu / r.seconds * 100:>7.0f} {scale:>9}"
                    + (f"  {r.errors} ERRORS" if r.errors else ""))
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="1,2", help="queue counts (1,2)")
    p.add_argument("--qd", type=int, default=64, help="requests in flight per queue (64)")
    p.add_argument("--backends", default=",".join(NAMES))
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2, help="median of this many runs (2)")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--image-size", default="1G")
    p.add_argument("--image-dir", default="/dev/shm")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    names = [n for n in args.backends.split(",") if n]
    for n in names:
        if n not in NAMES:
            raise SystemExit(f"unknown back-end {n!r} (known: {', '.join(NAMES)})")
    if "qsd" in names and not shutil.which("qemu-storage-daemon"):
        raise SystemExit("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    counts = [int(q) for q in args.queues.split(",") if q]
    size = parse_size(args.image_size)
    capacity = size // SECTOR
    info = machine_info()
    started = time.monotonic()
    runs: list[MqResult] = []
    with _workdir(args.image_dir) as workdir:
        image = os.path.join(workdir, "mq.img")
        print(f"making a {size / MIB:.0f} MiB image in {args.image_dir} ...", file=sys.stderr)
        make_image(image, size)
        turn = 0
        for _ in range(args.rounds):
            for queues in counts:
                order = names if turn % 2 == 0 else names[::-1]
                turn += 1
                for name in order:
                    sock = os.path.join(workdir, f"{name}.sock")
                    log_path = os.path.join(workdir, f"{name}.log")
                    argv_ = BACKENDS[name].command(sock, image, args.queue_size, queues)
                    with BackendProcess(argv_, sock, None, log_path=log_path) as proc:
                        res = trio.run(session, args, sock, proc.pid, queues, capacity)
                    res.backend = name
                    runs.append(res)
                    print(f"  {name:<15} {queues} queue(s): {res.iops:,.0f} IOPS", file=sys.stderr)
    medians: list[MqResult] = []
    for name in names:
        for queues in counts:
            mine = sorted((r for r in runs if r.backend == name and r.queues == queues),
                          key=lambda r: r.iops)
            medians.append(mine[len(mine) // 2])
    print("\n".join(info))
    print(f"multi-queue: 4 KiB random reads, {args.qd} in flight per queue, one front-end "
          f"process per queue, {args.duration:g} s after {args.warmup:g} s warm-up, nothing "
          f"pinned; median of {args.rounds} round(s) ({time.monotonic() - started:.0f} s)")
    print()
    print(table(medians, names))
    return 1 if any(r.errors for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
