"""virtio-net with several queue pairs: does outboard's rate grow with them?

    python -m bench.net_mq                   # rxonly 64 B, 1 and 2 pairs, 2 rounds
    python -m bench.net_mq --mode txonly --pairs 1,2,4

DPDK testpmd's virtio-user with N queue pairs (``queues=N``, ``--rxq=N
--txq=N``, one forwarding lcore polling them all, pinned to one core) against
``outboard net --generate SIZE --queues N``, with every pair in the one
outboard process, and with ``--queue-processes`` (a process per pair). After
the warm-up the pair processes are put one per core, from the last core down
(left alone, the scheduler keeps them together on the core testpmd does not
use); with 2 cores the second one shares testpmd's core with its busy-polling
lcore and gets about half of it. The rate is testpmd's own Rx-pps (rxonly)
or Tx-pps (txonly) of its virtio port, the median of the seconds measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .net import TESTPMD, Proc, _samples, _wait_for_socket
from .procs import children, family_cpu


def testpmd(core: int, socket_path: Path, mode: str, size: int, pairs: int) -> list[str]:
    vdev = f"net_virtio_user0,path={socket_path},queues={pairs},queue_size=1024"
    return [TESTPMD, "--no-huge", "-m", "512", "--no-shconf", "--no-pci",
            f"--file-prefix=obmq{os.getpid()}", "--lcores", f"0@{core},1@{core}",
            "--vdev", vdev, "--", "--total-num-mbufs=65536", f"--forward-mode={mode}",
            "--nb-cores=1", f"--rxq={pairs}", f"--txq={pairs}", f"--txpkts={size}",
            "--burst=32", "--no-flush-rx", "--stats-period=1"]


def measure(mode: str, size: int, pairs: int, processes: bool, *, warmup: float,
            seconds: float, workdir: Path) -> tuple[float, float, int]:
    """(Mpps, outboard's CPU in cores, its processes)."""
    socket_path = workdir / "net.sock"
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    argv = [sys.executable, "-m", "outboard", "net", "--generate", str(size),
            "--queues", str(pairs), "--socket-path", str(socket_path)]
    if processes:
        argv.append("--queue-processes")
    cores = sorted(os.sched_getaffinity(0))
    back = Proc(argv, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait_for_socket(socket_path, back)
        front = Proc(testpmd(cores[0], socket_path, mode, size, pairs))
        try:
            time.sleep(warmup)
            # One core per pair process, starting from the core testpmd leaves
            # free (the scheduler alone keeps them together on that one).
            for i, pid in enumerate(sorted(children(back.pid))):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, {cores[(len(cores) - 1 - i) % len(cores)]})
            time.sleep(1.0)
            cpu = family_cpu(back.pid)
            started = time.monotonic()
            before = len(front.lines)
            time.sleep(seconds)
            cpu = (family_cpu(back.pid) - cpu) / (time.monotonic() - started)
            count = 1 + len(children(back.pid))
            window = front.lines[before:]
        finally:
            front.stop()
    finally:
        back.stop()
    key = "Tx" if mode == "txonly" else "Rx"
    samples = _samples(window, key)
    if not samples:
        print(front.output[-3000:], back.output[-3000:], file=sys.stderr, sep="\n")
        return 0.0, cpu, count
    # testpmd prints one line per port per period; one virtio port here.
    return statistics.median(samples) / 1e6, cpu, count


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("rxonly", "txonly"), default="rxonly")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pairs", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.pairs.split(",") if x]
    rows: dict[tuple[int, bool], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="outboard-net-mq-") as tmp:
        for rnd in range(args.rounds):
            for pairs in counts:
                for processes in ((False, True) if rnd % 2 == 0 else (True, False)):
                    res = measure(args.mode, args.size, pairs, processes, warmup=args.warmup,
                                  seconds=args.seconds, workdir=Path(tmp))
                    rows.setdefault((pairs, processes), []).append(res)
                    print(f"  {pairs} pair(s) {'processes' if processes else 'one process'}: "
                          f"{res[0]:.3f} Mpps, outboard CPU {res[1]:.2f} cores", file=sys.stderr)
    print(f"{args.mode} {args.size} B, testpmd's forwarding lcore on core "
          f"{sorted(os.sched_getaffinity(0))[0]}, pair processes one per core; median of "
          f"{args.rounds} round(s)")
    head = f"{'pairs':>5}  {'outboard':<12} {'Mpps':>6}  {'CPU (cores)':>11}  {'processes':>9}"
    print(head)
    print("-" * len(head))
    for (pairs, processes), runs in sorted(rows.items()):
        runs.sort()
        mpps, cpu, count = runs[len(runs) // 2]
        print(f"{pairs:>5}  {'per pair' if processes else 'one process':<12} {mpps:>6.3f}  "
              f"{cpu:>11.2f}  {count:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
