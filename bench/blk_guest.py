"""virtio-blk seen from a guest: fio in a QEMU guest on outboard and on qemu-storage-daemon.

    python -m bench.blk_guest            # 8 s per fio job
    python -m bench.blk_guest --quick    # 2 s per fio job

The guest (outboard.testing.guest: a distribution kernel, busybox and fio with
its libraries in the initramfs) gets the back-end as a vhost-user-blk-pci disk,
/dev/vda, and runs one fio job after the other on it. QEMU runs on the
front-end core, the back-end on the other. Without KVM the guest runs under
TCG, whose emulation cost dominates: these numbers say how each back-end does
behind a (slow) real guest, not what the back-end can do.

The guest writes a line to a third serial port, connected to this process, just
before and just after each fio job; the CPU time of QEMU and of the back-end is
sampled when each line arrives, so the CPU columns cover each job alone (fio's
start-up included), not the boot.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from outboard.testing.guest import Guest, GuestError

from .blk import MIB, RunResult, _pin, _workdir, judge, machine_info, parse_size, table
from .procs import BACKENDS, BackendProcess, CpuSnapshot, Usage, make_image, process_cpu, run_delay
from .ring import PhaseResult

__all__ = ["FIO_JOBS", "FioJob", "main"]


@dataclass(frozen=True)
class FioJob:
    name: str  # the workload name in the table
    rw: str
    block_size: str
    iodepth: int

    def command(self, runtime: float) -> str:
        return shlex.join([
            "fio", f"--name={self.name}", "--filename=/dev/vda", f"--rw={self.rw}",
            f"--bs={self.block_size}", f"--iodepth={self.iodepth}", "--ioengine=libaio",
            "--direct=1", f"--runtime={runtime:g}", "--time_based", "--lat_percentiles=1",
            "--randrepeat=1", "--norandommap", "--output-format=json",
        ])


FIO_JOBS: dict[str, FioJob] = {
    "randread-4k/1": FioJob("randread-4k", "randread", "4k", 1),
    "randread-4k/32": FioJob("randread-4k", "randread", "4k", 32),
    "randwrite-4k/32": FioJob("randwrite-4k", "randwrite", "4k", 32),
}


class _Markers:
    """Listens for the guest's serial port; samples CPU use at every line it gets."""

    def __init__(self, path: str, backend_pid: int) -> None:
        self.path = path
        self.backend_pid = backend_pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.samples: dict[str, CpuSnapshot] = {}
        self.qemu_pid = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            self.qemu_pid = struct.unpack("3i", creds)[0]
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").strip()
                    if text:
                        self.samples[text] = self._sample()

    def _sample(self) -> CpuSnapshot:
        snap = CpuSnapshot.take(self.backend_pid)
        # the front-end here is QEMU, not this process
        try:
            snap.frontend = process_cpu(self.qemu_pid)
            snap.frontend_delay = run_delay(self.qemu_pid)
        except OSError:
            snap.frontend = snap.frontend_delay = float("nan")
        return snap

    def close(self) -> None:
        self.sock.close()
        self._thread.join(2)


def _script(jobs: Sequence[FioJob], runtime: float) -> str:
    lines = [
        "wait-for-path /dev/vda 60 || exit 1",
        "stty -F /dev/ttyS2 raw -echo 2>/dev/null",
        "echo none > /sys/block/vda/queue/scheduler 2>/dev/null",
    ]
    for i, job in enumerate(jobs):
        tag = f"{i}-{job.name}-{job.iodepth}"
        lines += [
            f"echo 'begin {tag}' > /dev/ttyS2",
            f"{job.command(runtime)} > /tmp/{tag}.json 2>&1; rc=$?",
            f"echo 'end {tag}' > /dev/ttyS2",
            f"echo '=== {tag}' rc=$rc",
            f"cat /tmp/{tag}.json",
        ]
    return "\n".join(lines) + "\n"


def _parse(output: str, jobs: Sequence[FioJob]) -> dict[str, dict[str, object]]:
    """The fio JSON of each job, by tag."""
    out: dict[str, dict[str, object]] = {}
    sections = output.split("=== ")[1:]
    for section in sections:
        head, _, body = section.partition("\n")
        tag = head.split()[0]
        start = body.find("{")
        if start < 0:
            continue
        try:
            out[tag] = json.loads(body[start:body.rfind("}") + 1])
        except json.JSONDecodeError:
            continue
    return out


def _result(name: str, job: FioJob, report: dict[str, object] | None, before: CpuSnapshot | None,
            after: CpuSnapshot | None, fe_core: int, be_core: int,
            be_realtime: bool) -> RunResult:
    phase = PhaseResult()
    percentiles: dict[int, float] = {}
    flagged = ""
    if report is None:
        flagged = "fio produced no report"
    else:
        data = report["jobs"][0]  # type: ignore[index]
        side = data["read" if "read" in job.rw else "write"]
        phase.completed = int(side["total_ios"])
        phase.bytes = int(side["io_bytes"])
        phase.seconds = float(side["runtime"]) / 1000 or 1.0
        phase.errors = int(data.get("error", 0))
        pct = side.get("lat_ns", {}).get("percentile") or side["clat_ns"]["percentile"]
        percentiles = {50: pct["50.000000"] / 1e3, 99: pct["99.000000"] / 1e3}
    if before is not None and after is not None:
        usage = Usage.between(before, after, fe_core, be_core, be_realtime=be_realtime)
    else:
        usage = Usage(1.0, float("nan"), float("nan"), 0, 0, 0, 0, 0)
        flagged = flagged or "no CPU samples"
    res = RunResult(backend=name, workload=job.name, qd=job.iodepth, phase=phase, usage=usage,
                    percentiles=percentiles)
    res.flagged = flagged
    return res


def run_backend(args: argparse.Namespace, guest: Guest, name: str, image: str,
                workdir: str, jobs: Sequence[FioJob]) -> list[RunResult]:
    sock = os.path.join(workdir, f"{name}.sock")
    marks = os.path.join(workdir, f"{name}.marks")
    log_path = os.path.join(workdir, f"{name}.log")
    argv = BACKENDS[name].command(sock, image, args.queue_size)
    with BackendProcess(argv, sock, {args.be_core}, log_path=log_path,
                        realtime=args.realtime) as proc:
        markers = _Markers(marks, proc.pid)
        try:
            qemu_args = [
                "-chardev", f"socket,id=blk0,path={sock}",
                "-device", f"vhost-user-blk-pci,chardev=blk0,num-queues=1,"
                           f"queue-size={args.queue_size}",
                "-chardev", f"socket,id=marks,path={marks}",
                "-serial", "chardev:marks",
            ]
            timeout = 180 + len(jobs) * (args.runtime + 30)
            result = guest.run(_script(jobs, args.runtime), qemu_args=qemu_args,
                               memory_mib=1024, timeout=timeout)
        finally:
            markers.close()
    if result.status != 0:
        raise GuestError(f"{name}: guest script failed ({result.status}):\n"
                         f"{result.output[-3000:]}")
    reports = _parse(result.output, jobs)
    out = []
    for i, job in enumerate(jobs):
        tag = f"{i}-{job.name}-{job.iodepth}"
        res = _result(name, job, reports.get(tag), markers.samples.get(f"begin {tag}"),
                      markers.samples.get(f"end {tag}"), args.fe_core, args.be_core,
                      bool(args.realtime))
        res.flagged = "; ".join(w for w in (res.flagged, judge(res, args)) if w)
        out.append(res)
        print(f"  guest {job.name:13} QD{job.iodepth:<3} {name:8} {res.iops:>9,.0f} IOPS  "
              f"QEMU {res.usage.frontend:4.0%}  BE {res.usage.backend:4.0%}  "
              f"starved {res.usage.starved:4.0%}", file=sys.stderr)
    print(f"  ({name}: guest ran {result.duration:.0f} s)", file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.blk_guest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=8.0, help="seconds per fio job (8)")
    p.add_argument("--quick", action="store_true", help="2 s per fio job")
    p.add_argument("--jobs", default=",".join(FIO_JOBS),
                   help=f"comma-separated, from {', '.join(FIO_JOBS)}")
    p.add_argument("--backends", default="outboard,qsd")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--image-size", default="1G")
    p.add_argument("--image-dir", default="/dev/shm")
    p.add_argument("--fe-core", type=int, default=0, help="core of QEMU (0)")
    p.add_argument("--be-core", type=int, default=1, help="core of the back-end (1)")
    p.add_argument("--max-starved", type=float, default=0.10)
    p.add_argument("--realtime", type=int, nargs="?", const=10, default=0, metavar="PRIO",
                   help="run the back-ends with SCHED_FIFO priority PRIO (10 if not given) "
                        "and QEMU with nice -20")
    p.add_argument("--no-machine-info", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.runtime = min(args.runtime, 2.0)
        if args.image_size == "1G":
            args.image_size = "128M"
    if shutil.which("fio") is None:
        print("fio is not installed (Debian: apt-get install fio)", file=sys.stderr)
        return 1
    unknown = [j for j in args.jobs.split(",") if j and j not in FIO_JOBS]
    if unknown:
        raise SystemExit(f"unknown job {unknown[0]!r} (known: {', '.join(FIO_JOBS)})")
    jobs = [FIO_JOBS[j] for j in args.jobs.split(",") if j]
    names = [n for n in args.backends.split(",") if n]
    _pin(args.fe_core)  # QEMU inherits it
    if args.realtime:
        # QEMU inherits this too: nice -20 rather than real-time, which would let
        # the TCG vCPU thread shut out QEMU's own main loop on its core.
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    print("building the guest (the first time takes a while) ...", file=sys.stderr)
    guest = Guest(host_binaries=["fio"])
    image_size = parse_size(args.image_size)
    results: list[RunResult] = []
    started = time.monotonic()
    with _workdir(args.image_dir) as workdir:
        first = os.path.join(workdir, "base.img")
        make_image(first, image_size)
        for n, name in enumerate(names):
            image = os.path.join(workdir, f"{name}.img")
            if n == len(names) - 1:
                os.rename(first, image)
            else:
                shutil.copyfile(first, image)
            results += run_backend(args, guest, name, image, workdir, jobs)
    order = {name: i for i, name in enumerate(names)}
    results.sort(key=lambda r: ([j.name for j in jobs].index(r.workload), r.qd,
                                order[r.backend]))
    if not args.no_machine_info:
        print("\n".join(machine_info()))
    print(f"guest-level: fio {args.runtime:g} s per job (libaio, direct=1, /dev/vda), "
          f"{image_size / MIB:.0f} MiB image, {guest.accel.upper()} guest with 1 vCPU, "
          f"vhost-user-blk-pci queue size {args.queue_size}; FE = the QEMU process"
          f"{f' (nice -20), back-end SCHED_FIFO {args.realtime}' if args.realtime else ''} "
          f"({time.monotonic() - started:.0f} s)")
    print()
    print(table(results))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
