"""End to end: a guest reads /dev/hwrng from the rng back-end, a PCI function over vfio-user.

The back-end (``python -m outboard rng --transport vfio-user``) serves a file of
known bytes as a whole virtio-rng PCI function, attached with QEMU's
``vfio-user-pci`` device (QEMU 10.1 or newer, see the ``qemu_vfio_user``
fixture). The guest's ``virtio_pci`` must bind to it and run it with MSI-X, and
its ``virtio_rng`` must read the file's bytes (the checks of
``test_rng_qemu.py``); the request queue's vector must get interrupts.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from outboard.testing.guest import BackendProcess, Guest, GuestUnavailable

from .test_rng_qemu import GUEST_SCRIPT as READ_SCRIPT
from .test_rng_qemu import SOURCE_SIZE, check_read

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: virtio-rng's PCI IDs: the virtio vendor and 0x1040 + device type 4.
PCI_ID = ("0x1af4", "0x1044")

SCRIPT = (
    rf"""
set -e
wait-for-path /dev/hwrng 60
pci=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = {PCI_ID[0]} ] && [ "$(cat $d/device)" = {PCI_ID[1]} ]; then
        pci=$d
    fi
done
[ -n "$pci" ] || {{ echo "no virtio-rng PCI function"; exit 1; }}
echo "driver: $(basename "$(readlink $pci/driver)")"
virtio=$(basename $pci/virtio*)
echo "virtio: $virtio"
echo "msi-irqs: $(cat $pci/msi_irqs/* | sort | uniq -c | tr -s ' \n' ' ')"
"""
    + READ_SCRIPT
    + r"""
echo "interrupts:"
head -n 1 /proc/interrupts
grep -E " $virtio-[^ ]+$" /proc/interrupts || true
echo "end-interrupts"
"""
)


@pytest.fixture(scope="module")
def vfio_guest(guest: Guest, qemu_vfio_user: Path) -> Guest:
    """The test guest booted by a QEMU with ``vfio-user-pci``."""
    try:
        return Guest(qemu=qemu_vfio_user)
    except GuestUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the test guest under CI: {exc}")
        pytest.skip(f"cannot build the test guest: {exc}")


def test_guest_reads_file_through_vfio_user_rng_function(
    vfio_guest: Guest, short_tmp: Path, tmp_path: Path
) -> None:
    data = random.Random(4321).randbytes(SOURCE_SIZE)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    socket_path = short_tmp / "rng.sock"
    device = {"driver": "vfio-user-pci", "socket": {"path": str(socket_path), "type": "unix"}}
    backend = BackendProcess(
        [
            "rng",
            "--transport", "vfio-user",
            "--socket-path", str(socket_path),
            "--source", str(path),
        ]
    )  # fmt: skip
    try:
        with backend:
            result = vfio_guest.run(SCRIPT, timeout=240, qemu_args=["-device", json.dumps(device)])
            code = backend.terminate(timeout=10)
    finally:
        print(f"back-end stderr:\n{backend.stderr}")  # shown when the test fails
    print(f"guest ran for {result.duration:.1f} s")
    match = re.search(r"^interrupts:\n(.*?)^end-interrupts$", result.output, re.M | re.S)
    interrupts = match.group(1).rstrip() if match else "(not printed)"
    print(f"guest /proc/interrupts for the device:\n{interrupts}")
    details = f"\n--- device interrupts ---\n{interrupts}\n--- guest output ---\n{result.output}"

    runs = check_read(result, data)
    print(f"the guest's read is {len(runs)} run(s) of the source: {runs}")
    fields = dict(re.findall(r"^([\w-]+): (.*)$", result.output, re.M))
    assert fields.get("driver") == "virtio-pci", f"not driven by virtio-pci{details}"
    assert fields.get("msi-irqs", "").split() == ["2", "msix"], f"expected 2 MSI-X{details}"
    virtio = fields["virtio"]
    counts = {
        words[-1]: sum(int(w) for w in words[1:-1] if w.isdigit())
        for words in (line.split() for line in interrupts.splitlines()[1:])
        if words and words[-1].startswith(f"{virtio}-")
    }
    assert sorted(counts) == [f"{virtio}-config", f"{virtio}-input"], f"vectors{details}"
    assert counts[f"{virtio}-input"] > 0, f"no interrupts on the request queue{details}"
    assert "Traceback" not in backend.stderr, "the back-end logged a traceback"
    assert code == 0, f"the back-end exited with {code} on SIGTERM"
