"""Fixtures for end-to-end tests that boot a Linux guest under QEMU.

Every test in this directory is marked ``e2e`` and ``slow``. When QEMU, a kernel
with modules or a static busybox is missing, the tests that boot a guest (those
using the ``guest`` fixture) are skipped; under CI (the ``CI`` environment
variable set) they fail instead. ``scripts/install-test-deps`` installs the parts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from outboard.testing.guest import (
    Guest,
    GuestUnavailable,
    find_busybox,
    find_kernel,
    find_qemu,
)

E2E_DIR = Path(__file__).resolve().parent


def _missing_parts() -> list[str]:
    missing = []
    for probe in (find_qemu, find_kernel, find_busybox):
        try:
            probe()
        except GuestUnavailable as exc:
            missing.append(str(exc))
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing: list[str] | None = None
    for item in items:
        if E2E_DIR not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.e2e)
        item.add_marker(pytest.mark.slow)
        if os.environ.get("CI") or "guest" not in getattr(item, "fixturenames", ()):
            continue
        if missing is None:
            missing = _missing_parts()
        if missing:
            reason = "cannot boot a test guest: " + "; ".join(missing)
            item.add_marker(pytest.mark.skip(reason=reason + " (run scripts/install-test-deps)"))


@pytest.fixture(scope="session")
def guest() -> Guest:
    """A guest with the default virtio modules; its initramfs is built once and cached."""
    try:
        return Guest()
    except GuestUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot boot a test guest under CI: {exc}")
        pytest.skip(f"cannot boot a test guest: {exc}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path, for Unix sockets (108-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="outboard-") as name:
        yield Path(name)


#: Builds (once, then cached) a QEMU with the ``vfio-user-pci`` device.
BUILD_QEMU_VFIO_USER = E2E_DIR.parents[1] / "scripts" / "build-qemu-vfio-user"
#: A cold build takes 5 to 15 minutes.
BUILD_QEMU_TIMEOUT = 1800


@pytest.fixture(scope="session")
def qemu_vfio_user(request: pytest.FixtureRequest) -> Path:
    """A ``qemu-system-x86_64`` (QEMU 10.1 or newer) with the ``vfio-user-pci`` device.

    Runs ``scripts/build-qemu-vfio-user``, which builds it the first time (its
    progress goes to the terminal) and afterwards prints the cached binary at
    once. Skips when it cannot be built, except under CI, where that fails.
    """
    import contextlib
    import subprocess
    import sys

    script = BUILD_QEMU_VFIO_USER.name
    capture = request.config.pluginmanager.getplugin("capturemanager")
    shown = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    binary: Path | None = None
    with shown:
        print(f"\n{script}: finding or building QEMU ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(
                [str(BUILD_QEMU_VFIO_USER)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                timeout=BUILD_QEMU_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = f"{script}: {exc}"
        else:
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                reason = f"{script} exited with {done.returncode} (its output is above)"
            elif not os.access(lines[-1].strip(), os.X_OK):
                reason = f"{script} printed {lines[-1].strip()!r}, not an executable"
            else:
                binary = Path(lines[-1].strip())
    if binary is not None:
        return binary
    if os.environ.get("CI"):
        pytest.fail(f"no QEMU with vfio-user-pci under CI: {reason}", pytrace=False)
    pytest.skip(f"no QEMU with vfio-user-pci: {reason}")
