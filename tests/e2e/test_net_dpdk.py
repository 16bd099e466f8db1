"""End to end: DPDK's virtio-user driver on outboard's virtio-net, without a VM.

``dpdk-testpmd`` forwards between two ports (io mode): a pcap port that reads an
input file of frames of many sizes and writes what comes back to an output
file, and a virtio-user port on ``outboard net --loopback --capture``. Every
frame goes out through outboard's transmit queue and comes back through its
receive queue; the output file must hold the input frames, byte for byte and
in order, and outboard's capture each of them once per direction.

With small mbufs (512 bytes) DPDK sends frames longer than one mbuf as chains
of segments (indirect descriptors) and receives them in several mergeable
buffers, so the general paths are checked as well as the one-descriptor ones.
Memory arrives as one memfd of 4 KiB pages (no hugepages) and ring addresses
are the front-end's virtual addresses.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outboard.devices.net import PcapWriter, read_pcap
from outboard.testing.guest import BackendProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FRAMES = 2000
TESTPMD = "dpdk-testpmd"
DRIVERS = ("net_virtio", "net_pcap")
SIZES = (60, 64, 65, 127, 128, 129, 500, 1000, 1499, 1514, 1518)


def dpdk_problem() -> str | None:
    if shutil.which(TESTPMD) is None:
        return f"{TESTPMD} not found (Debian: dpdk)"
    for driver in DRIVERS:
        if not glob.glob(f"/usr/lib/*/dpdk/pmds-*/librte_{driver}.so*"):
            return f"DPDK driver librte_{driver} not installed (Debian: librte-{driver[4:]}*)"
    return None


@pytest.fixture(scope="module")
def dpdk() -> None:
    problem = dpdk_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"DPDK is needed under CI: {problem} (run scripts/install-test-deps)")
        pytest.skip(f"{problem} (run scripts/install-test-deps)")


def make_frames(count: int, seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        size = rng.choice(SIZES) if i % 2 else rng.randint(60, 1518)
        dst = bytes((0x02, 0, 0, 0, 0, rng.randint(1, 9)))
        frames.append(dst + bytes.fromhex("020000000101") + b"\x88\xb5" + rng.randbytes(size - 14))
    return frames


def _core() -> int:
    return max(os.sched_getaffinity(0))


@contextlib.contextmanager
def run_testpmd(ports: list[str], options: list[str], commands: str,
            workdir: Path) -> Iterator[subprocess.Popen[str]]:
    """testpmd with ``ports`` (EAL --vdev arguments), application ``options``
    and ``commands`` run before forwarding starts; SIGINT ends it."""
    script = workdir / "commands"
    script.write_text(commands)
    core = _core()
    argv = [TESTPMD, "--no-huge", "-m", "512", "--no-shconf", "--no-pci",
            f"--file-prefix=outboard-{os.getpid()}-{time.monotonic_ns()}",
            "--lcores", f"0@{core},1@{core},2@{core}", *ports,
            "--", "--total-num-mbufs=16384", "--forward-mode=io", "--nb-cores=2",
            "--no-flush-rx", "--stats-period=1", f"--cmdline-file={script}", *options]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _wait_for_port0_tx(proc: subprocess.Popen[str], count: int, timeout: float) -> str:
    """Read testpmd's periodic statistics until port 0 has sent ``count`` frames."""
    assert proc.stdout is not None
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        port = None
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"NIC statistics for port (\d+)", line):
                port = int(m.group(1))
            elif port == 0 and (m := re.search(r"TX-packets: +(\d+)", line)) \
                    and int(m.group(1)) >= count:
                done.set()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done.wait(timeout)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    proc.wait(30)
    reader.join(10)
    return "".join(lines)


@pytest.mark.parametrize("mbuf_size", [None, 512], ids=["one-buffer", "segmented"])
def test_frames_of_many_sizes_round_trip_through_dpdk(
    dpdk: None, short_tmp: Path, mbuf_size: int | None
) -> None:
    frames = make_frames(FRAMES)
    given, returned, captured = (short_tmp / name for name in ("in.pcap", "out.pcap",
                                                                "cap.pcap"))
    writer = PcapWriter(str(given))
    for f in frames:
        writer.write(f)
    writer.close()
    socket_path = short_tmp / "net.sock"
    backend = BackendProcess(["net", "--loopback", "--capture", str(captured),
                              "--socket-path", str(socket_path)])
    ports = ["--vdev", f"net_pcap0,rx_pcap={given},tx_pcap={returned}",
             "--vdev", f"net_virtio_user0,path={socket_path},queues=1,queue_size=1024"]
    # Forward with retries (never drop for a full ring), one core per direction
    # so that a waiting sender never stops the receiver; with small mbufs the
    # virtio port must scatter received frames over several mbufs.
    commands = "set fwd io retry\nset burst tx delay 10 retry 100000\n"
    options = []
    if mbuf_size is not None:
        options = [f"--mbuf-size={mbuf_size}", "--disable-device-start"]
        commands = "port config 1 rx_offload scatter on\nport start all\n" + commands
    started = time.monotonic()
    try:
        with backend:
            with run_testpmd(ports, options, commands, short_tmp) as proc:
                output = _wait_for_port0_tx(proc, FRAMES, timeout=120)
            code = backend.terminate(timeout=10)
    finally:
        print(f"back-end stderr:\n{backend.stderr}")
    print(f"dpdk round trip ({mbuf_size or 'default'} mbufs): "
          f"{time.monotonic() - started:.1f} s")
    assert "Traceback" not in backend.stderr
    assert code == 0
    back = [r.data for r in read_pcap(str(returned))]
    assert len(back) == FRAMES, output[-3000:]
    assert back == frames
    seen = [r.data for r in read_pcap(str(captured))]
    assert seen[0::2] == frames and seen[1::2] == frames
    assert "rx_ring_full" not in backend.stderr
