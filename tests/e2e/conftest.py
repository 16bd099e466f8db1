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
