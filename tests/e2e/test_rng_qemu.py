"""End to end: a guest reads /dev/hwrng from the vhost-user rng back-end.

The back-end runs as a user would run it (``python -m outboard rng``) and serves
a file of known bytes; the guest's virtio-rng driver reads them through QEMU's
``vhost-user-rng-pci`` device, and the test finds them in the file.

A control test runs the same guest script against QEMU's built-in virtio-rng
device reading the same file, so a failure of the back-end test can be told
apart from a problem with the guest itself.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from outboard.testing.guest import BackendProcess, Guest, GuestResult

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOURCE_SIZE = 1 << 20
READ_SIZE = 4096

# The guest kernel's hwrng thread also reads the device now and then (64 bytes at
# a time, every second or so early in boot), and may take its turn in the middle
# of our read. Those bytes are missing from what the guest script sees, so the
# read is allowed to be a few in-order runs of the file with small gaps between.
MAX_RUNS = 3
MAX_GAP = 1024

GUEST_SCRIPT = rf"""
set -e
hw=/sys/class/misc/hw_random
echo "rng_available: $(cat $hw/rng_available)"
echo "rng_current: $(cat $hw/rng_current)"
dd if=/dev/hwrng of=/tmp/rng.bin bs={READ_SIZE} count=1 iflag=fullblock 2>/dev/null
echo "size: $(wc -c < /tmp/rng.bin)"
echo "data: $(hexdump -v -e '/1 "%02x"' /tmp/rng.bin)"
"""


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(1234).randbytes(SOURCE_SIZE)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def _field(result: GuestResult, name: str) -> str:
    match = re.search(rf"^{name}: (.*)$", result.output, re.MULTILINE)
    assert match is not None, f"no {name!r} line in guest output:\n{result.output}"
    return match.group(1).strip()


def locate_runs(got: bytes, source: bytes, *, probe: int = 16) -> list[tuple[int, int]]:
    """Split ``got`` into runs of consecutive bytes of ``source`` (read cyclically).

    Returns ``(offset in source, length)`` per run. Each run after the first must
    start at most :data:`MAX_GAP` bytes after the previous one ended. Raises
    AssertionError if ``got`` cannot be explained that way.
    """
    ring = source + source[: len(got) + MAX_GAP + probe]
    start = ring.find(got[:probe])
    assert start >= 0, f"first bytes of the guest's read not in the source: {got[:probe].hex()}"
    runs: list[tuple[int, int]] = []
    pos = start
    i = 0
    while i < len(got):
        length = 0
        while i + length < len(got) and ring[pos + length] == got[i + length]:
            length += 1
        assert length > 0, f"guest byte {i} does not follow the source at offset {pos}"
        runs.append((pos % len(source), length))
        i += length
        if i == len(got):
            break
        window = ring[pos + length : pos + length + MAX_GAP + probe]
        skip = window.find(got[i : i + probe], 1)
        assert skip > 0, (
            f"guest bytes from {i} on are not the source's next bytes after offset "
            f"{(pos + length) % len(source)} (even allowing a gap of {MAX_GAP})"
        )
        pos = pos + length + skip
    return runs


def check_read(result: GuestResult, data: bytes) -> list[tuple[int, int]]:
    assert result.status == 0, f"guest script failed:\n{result.output}\n{result.console}"
    current = _field(result, "rng_current")
    assert current.startswith("virtio_rng."), f"hwrng is {current!r}, not a virtio rng"
    assert current in _field(result, "rng_available").split()
    assert int(_field(result, "size")) == READ_SIZE
    got = bytes.fromhex(_field(result, "data"))
    assert len(got) == READ_SIZE
    runs = locate_runs(got, data)
    assert len(runs) <= MAX_RUNS, f"guest read is split into {len(runs)} runs: {runs}"
    return runs


def test_guest_reads_file_through_qemu_builtin_rng(
    guest: Guest, source: tuple[Path, bytes]
) -> None:
    path, data = source
    result = guest.run(
        GUEST_SCRIPT,
        qemu_args=[
            "-object", f"rng-random,id=rng0,filename={path}",
            "-device", "virtio-rng-pci,rng=rng0",
        ],
    )  # fmt: skip
    check_read(result, data)


def test_guest_reads_file_through_vhost_user_rng_backend(
    guest: Guest, source: tuple[Path, bytes], short_tmp: Path
) -> None:
    path, data = source
    socket_path = short_tmp / "rng.sock"
    backend = BackendProcess(["rng", "--socket-path", str(socket_path), "--source", str(path)])
    try:
        with backend:
            assert socket_path.is_socket(), f"back-end reported ready but {socket_path} isn't"
            result = guest.run(
                GUEST_SCRIPT,
                qemu_args=[
                    "-chardev", f"socket,id=rng0,path={socket_path}",
                    "-device", "vhost-user-rng-pci,chardev=rng0",
                ],
            )  # fmt: skip
            check_read(result, data)
            code = backend.terminate(timeout=10)
    finally:
        print(f"back-end stderr:\n{backend.stderr}")  # shown by pytest when the test fails
    stderr = backend.stderr
    assert "Traceback" not in stderr, f"back-end logged a traceback:\n{stderr}"
    assert code == 0, f"back-end exited with {code} on SIGTERM; stderr:\n{stderr}"


@pytest.mark.parametrize(
    ("got_offsets", "expect_runs"),
    [
        ([(100, 64)], [(100, 64)]),
        ([(SOURCE_SIZE - 10, 40)], [(SOURCE_SIZE - 10, 40)]),
        ([(0, 32), (96, 32)], [(0, 32), (96, 32)]),
    ],
)
def test_locate_runs(
    got_offsets: list[tuple[int, int]], expect_runs: list[tuple[int, int]]
) -> None:
    data = random.Random(1234).randbytes(SOURCE_SIZE)
    ring = data + data
    got = b"".join(ring[offset : offset + length] for offset, length in got_offsets)
    assert locate_runs(got, data) == expect_runs


def test_locate_runs_rejects_foreign_bytes() -> None:
    data = random.Random(1234).randbytes(SOURCE_SIZE)
    with pytest.raises(AssertionError):
        locate_runs(data[5000:5032] + bytes(32), data)
