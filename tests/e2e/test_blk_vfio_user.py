"""End to end: a Linux guest drives the blk back-end as a whole PCI function over vfio-user.

The back-end runs as a user would run it (``python -m outboard blk --transport
vfio-user``) over a sparse raw image. QEMU (10.1 or newer, see the
``qemu_vfio_user`` fixture) attaches it as a ``vfio-user-pci`` device: the PCI
configuration space, the BARs, MSI-X and the virtio structures are all the
back-end's. The guest (two vCPUs, two request queues) must find and use it with
its own drivers:

* ``virtio_pci`` binds to the function and ``virtio_blk`` makes ``/dev/vda``;
* the function runs with MSI-X: a vector for configuration changes and one per
  request queue, and the request queue vectors get interrupts (their lines in
  the guest's ``/proc/interrupts`` are printed by the test);
* direct I/O from two writers at once, one pinned to each vCPU (so one per
  request queue), reads back the same in the guest and is in the image on the
  host;
* an ext4 file system made on the first part of the disk, filled, checked with
  ``e2fsck`` and read back in the guest, and checked again on the host.

Without KVM the guest's queue notifications reach the back-end as region
writes over the socket rather than through ioeventfds; that is slower but must
work the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from outboard.testing.guest import (
    DEFAULT_MODULES,
    BackendProcess,
    Guest,
    GuestResult,
    GuestUnavailable,
)

from .test_blk_qemu import make_files as make_tar

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
NUM_QUEUES = 2
CPUS = 2
#: virtio-blk's PCI IDs: the virtio vendor and 0x1040 + device type 2.
PCI_ID = ("0x1af4", "0x1042")

#: The ext4 file system takes the first FS_MIB MiB of the disk; the raw writers
#: use two regions of WRITER_MIB MiB from RAW_AT MiB on.
FS_MIB = 96
RAW_AT = 128
WRITER_MIB = 8

#: ext4 and the crc32c cipher its checksums need (the guest cannot load it on demand).
MODULES = (*DEFAULT_MODULES, "ext4", "crc32c_generic")
HOST_PROGRAMS = ("mke2fs", "e2fsck")

NUM_FILES = 100
NUM_DIRS = 5
MAX_FILE_SIZE = 64 * 1024

_TAIL = 3000

GUEST_SCRIPT = rf"""
set -e
here=$PWD  # where the files given to the guest are
dev=/dev/vda
wait-for-path $dev 60

# The function and who drives it.
pci=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = {PCI_ID[0]} ] && [ "$(cat $d/device)" = {PCI_ID[1]} ]; then
        pci=$d
    fi
done
[ -n "$pci" ] || {{ echo "no virtio-blk PCI function"; lspci; exit 1; }}
addr=${{pci##*/}}
echo "pci: $addr"
echo "driver: $(basename "$(readlink $pci/driver)")"
echo "bound: $([ -e /sys/bus/pci/drivers/virtio-pci/$addr ] && echo yes || echo no)"
virtio=$(basename $pci/virtio*)
echo "virtio: $virtio"
echo "block: $(ls $pci/$virtio/block)"
echo "msi-irqs: $(cat $pci/msi_irqs/* | sort | uniq -c | tr -s ' \n' ' ')"
echo "mq: $(ls /sys/block/vda/mq | tr '\n' ' ')"
echo "size: $(blockdev --getsize64 $dev)"
interrupts() {{
    echo "interrupts-$1:"
    head -n 1 /proc/interrupts
    grep -E " $virtio-[^ ]+\$" /proc/interrupts || true
    echo "end-interrupts-$1"
}}
interrupts before

# Two direct writers at once, one per vCPU, so one per request queue; each
# region is read back through the other queue.
dd if=/dev/urandom of=/tmp/a bs=1M count={WRITER_MIB} 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count={WRITER_MIB} 2>/dev/null
seek_a=$(({RAW_AT} * 16))
seek_b=$((({RAW_AT} + {WRITER_MIB}) * 16))
count=$(({WRITER_MIB} * 16))
taskset -c 0 dd if=/tmp/a of=$dev bs=64k seek=$seek_a oflag=direct 2>/tmp/a.log &
writer_a=$!
taskset -c 1 dd if=/tmp/b of=$dev bs=64k seek=$seek_b oflag=direct 2>/tmp/b.log &
writer_b=$!
status_a=0; wait $writer_a || status_a=$?
status_b=0; wait $writer_b || status_b=$?
echo "writers: $status_a $status_b"
[ $status_a = 0 ] || cat /tmp/a.log
[ $status_b = 0 ] || cat /tmp/b.log
taskset -c 1 dd if=$dev of=/tmp/a.back bs=64k skip=$seek_a count=$count iflag=direct 2>/dev/null
taskset -c 0 dd if=$dev of=/tmp/b.back bs=64k skip=$seek_b count=$count iflag=direct 2>/dev/null
cmp -s /tmp/a /tmp/a.back && echo "readback-a: same" || echo "readback-a: different"
cmp -s /tmp/b /tmp/b.back && echo "readback-b: same" || echo "readback-b: different"
echo "written-md5: $(cat /tmp/a /tmp/b | md5sum | cut -d' ' -f1)"
echo "device-md5: $(dd if=$dev bs=1M skip={RAW_AT} count=$((2 * {WRITER_MIB})) iflag=direct \
    2>/dev/null | md5sum | cut -d' ' -f1)"
rm /tmp/a /tmp/b /tmp/a.back /tmp/b.back
interrupts after

# ext4 on the first {FS_MIB} MiB.
mke2fs -q -F -t ext4 -L outboard $dev {FS_MIB}M
mkdir -p /mnt/disk
mount -t ext4 $dev /mnt/disk
mkdir /mnt/disk/data
tar -xf $here/files.tar -C /mnt/disk/data
echo "files: $(find /mnt/disk/data -type f | wc -l)"
umount /mnt/disk
status=0
e2fsck -fn $dev || status=$?
echo "fsck-status: $status"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro $dev /mnt/disk
cd /mnt/disk/data
md5sum -c -s $here/files.md5 && echo "reread: same" || echo "reread: different"
cd /
umount /mnt/disk
echo "done: vfio-user blk"
"""


@pytest.fixture(scope="module")
def vfio_guest(guest: Guest, qemu_vfio_user: Path) -> Guest:
    """The test guest booted by a QEMU with ``vfio-user-pci``, plus ext4 and e2fsprogs."""
    try:
        return Guest(qemu=qemu_vfio_user, modules=MODULES, host_binaries=HOST_PROGRAMS)
    except GuestUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the vfio-user blk test guest under CI: {exc}")
        pytest.skip(f"cannot build the vfio-user blk test guest: {exc}")


@dataclasses.dataclass
class Run:
    """A guest run against the back-end, and what the back-end logged."""

    result: GuestResult
    stderr: str
    interrupts: str = ""

    def details(self) -> str:
        return (
            f"--- device MSI-X interrupts ---\n{self.interrupts or '(none found)'}\n"
            f"--- guest script output (status {self.result.status}) ---\n"
            f"{_tail(self.result.output)}\n"
            f"--- guest console ---\n{_tail(self.result.console)}\n"
            f"--- back-end stderr ---\n{_tail(self.stderr)}"
        )

    def field(self, name: str) -> str:
        match = re.search(rf"^{re.escape(name)}: (.*)$", self.result.output, re.MULTILINE)
        if match is None:
            pytest.fail(f"no {name!r} line in the guest's output\n{self.details()}", pytrace=False)
        return match.group(1).strip()

    def section(self, name: str) -> str:
        """The lines the script printed between ``name:`` and ``end-name`` ("" if none)."""
        match = re.search(
            rf"^{re.escape(name)}:\n(.*?)^end-{re.escape(name)}$",
            self.result.output,
            re.MULTILINE | re.DOTALL,
        )
        return match.group(1) if match else ""

    def check(self, condition: bool, message: str) -> None:
        """Fail with ``message`` and everything the guest and back-end printed."""
        if not condition:
            pytest.fail(f"{message}\n{self.details()}", pytrace=False)


def _tail(text: str, limit: int = _TAIL) -> str:
    text = text.rstrip()
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def vector_counts(proc_interrupts: str, virtio: str) -> dict[str, int]:
    """Interrupts per vector of the virtio device ``virtio`` (say ``virtio0``), all CPUs."""
    counts: dict[str, int] = {}
    for line in proc_interrupts.splitlines():
        words = line.split()
        if len(words) < 2 or not words[-1].startswith(f"{virtio}-"):
            continue
        counts[words[-1]] = sum(int(w) for w in words[1 : 1 + CPUS] if w.isdigit())
    return counts


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_files(tmp_path: Path) -> tuple[Path, str]:
    """A tar of :data:`NUM_FILES` files of random sizes, and their ``md5sum`` list."""
    path, files = make_tar(tmp_path, count=NUM_FILES, dirs=NUM_DIRS, max_size=MAX_FILE_SIZE,
                           seed=11)
    return path, "".join(f"{md5(data)}  {name}\n" for name, data in files.items())


def test_guest_drives_blk_function_over_vfio_user(
    vfio_guest: Guest, short_tmp: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    tar_path, sums = make_files(tmp_path)
    socket_path = short_tmp / "blk.sock"
    device = {"driver": "vfio-user-pci", "socket": {"path": str(socket_path), "type": "unix"}}
    backend = BackendProcess(
        [
            "blk",
            "--transport", "vfio-user",
            "--socket-path", str(socket_path),
            "--blk-file", str(image),
            "--num-queues", str(NUM_QUEUES),
        ]
    )  # fmt: skip
    try:
        with backend:
            result = vfio_guest.run(
                GUEST_SCRIPT,
                cpus=CPUS,
                timeout=480,
                files={"root/files.tar": tar_path, "root/files.md5": sums},
                qemu_args=["-device", json.dumps(device)],
            )
            code = backend.terminate(timeout=10)
    finally:
        print(f"back-end stderr:\n{_tail(backend.stderr)}")  # shown when the test fails
    print(f"guest ran for {result.duration:.1f} s")
    run = Run(result, backend.stderr)
    before = run.section("interrupts-before")
    after = run.section("interrupts-after")
    run.interrupts = after.rstrip() or before.rstrip()
    print(f"guest /proc/interrupts for the device's vectors:\n{run.interrupts or '(none)'}")
    check, field = run.check, run.field

    check(result.status == 0, f"the guest script exited with status {result.status}")
    check("Traceback" not in run.stderr, "the back-end logged a traceback")
    check(code == 0, f"the back-end exited with {code} on SIGTERM")
    check(field("done") == "vfio-user blk", "the guest script did not get to its end")
    virtio = field("virtio")

    # The guest's own drivers bound to the function.
    check(field("driver") == "virtio-pci", f"the function is driven by {field('driver')!r}")
    check(field("bound") == "yes", "the function is not under /sys/bus/pci/drivers/virtio-pci")
    check(field("block") == "vda", f"the virtio device's block device is {field('block')!r}")
    check(int(field("size")) == IMAGE_SIZE, f"disk size {field('size')} != {IMAGE_SIZE}")
    check(
        field("mq").split() == [str(i) for i in range(NUM_QUEUES)],
        f"the disk has hardware queues {field('mq')!r}, expected {NUM_QUEUES}",
    )

    # MSI-X: one vector for configuration changes and one per request queue.
    modes = field("msi-irqs").split()
    check(
        modes == [str(1 + NUM_QUEUES), "msix"],
        f"expected {1 + NUM_QUEUES} MSI-X vectors in msi_irqs, found {modes}",
    )
    counts_before, counts = vector_counts(before, virtio), vector_counts(after, virtio)
    queues = [f"{virtio}-req.{i}" for i in range(NUM_QUEUES)]
    check(
        sorted(counts) == sorted([f"{virtio}-config", *queues]),
        f"the device's vectors in /proc/interrupts are {sorted(counts)}",
    )
    check(
        all("MSI" in line for line in after.splitlines()[1:]),
        "a vector of the device is not an MSI interrupt",
    )
    print(f"request-queue interrupts before the writers: {counts_before}, after: {counts}")
    for name in queues:
        check(counts[name] > 0, f"no interrupts on {name}")
        check(
            counts[name] > counts_before.get(name, 0),
            f"no interrupts on {name} while the two writers ran: {counts_before} -> {counts}",
        )

    # Data written in the guest, read back in the guest and found on the host.
    check(field("writers") == "0 0", f"a direct writer failed: {field('writers')}")
    check(field("readback-a") == "same", "the first writer's data read back differently")
    check(field("readback-b") == "same", "the second writer's data read back differently")
    written = field("written-md5")
    check(field("device-md5") == written, "the device does not hold what was written")
    with image.open("rb") as f:
        f.seek(RAW_AT * MiB)
        host = md5(f.read(2 * WRITER_MIB * MiB))
    check(host == written, f"the image holds md5 {host}, the guest wrote {written}")

    # ext4, in the guest and on the host.
    check(int(field("files")) == NUM_FILES, f"{field('files')} files written, not {NUM_FILES}")
    check(field("fsck-status") == "0", "e2fsck -fn found problems in the guest")
    check(field("reread") == "same", "the files read back differently after a remount")
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    e2fsck = shutil.which("e2fsck", path=search)
    if e2fsck is not None:
        fsck = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
        check(
            fsck.returncode == 0,
            f"host e2fsck -fn exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}",
        )
