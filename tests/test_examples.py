"""The programs in examples/ run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from outboard.testing.guest import BackendProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_counter_rng_read_by_read_rng(tmp_path: Path) -> None:
    sock = str(tmp_path / "counter.sock")
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "counter_rng.py"), sock],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "listening on" in proc.stderr.readline()
        out = subprocess.run([sys.executable, str(EXAMPLES / "read_rng.py"), sock, "300"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert bytes.fromhex(out.strip()) == bytes(i & 0xFF for i in range(300))


def test_read_rng_against_the_shipped_rng(tmp_path: Path) -> None:
    sock = str(tmp_path / "rng.sock")
    source = tmp_path / "src"
    source.write_bytes(b"outboard" * 10)
    with BackendProcess(["rng", "--socket-path", sock, "--source", str(source)]) as backend:
        out = subprocess.run([sys.executable, str(EXAMPLES / "read_rng.py"), sock, "16"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert backend.terminate(10) == 0
    assert bytes.fromhex(out.strip()) == b"outboardoutboard"
