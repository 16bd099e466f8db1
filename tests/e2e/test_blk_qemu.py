"""End to end: a Linux guest uses a disk served by the vhost-user blk back-end.

The back-end runs as a user would run it (``python -m outboard blk``) over a
sparse raw image; QEMU attaches it as ``vhost-user-blk-pci`` with two request
queues and the guest (two vCPUs) drives it with its own virtio-blk driver:

* direct I/O from two writers at once, one pinned to each vCPU, so that both
  request queues carry requests; the data is read back in the guest and, after
  the guest is gone, found in the image on the host;
* discard and write-zeroes, which must read back as zeros in the guest and on
  the host, while the data around them stays;
* the volatile write cache: the guest switches it with ``cache_type`` and its
  flushes reach the device (the disk's flush counter goes up);
* the serial number (``--serial``), read through ``VIRTIO_BLK_T_GET_ID``;
* an ext4 file system made, filled, checked and read back in the guest, and
  checked and unpacked again on the host with e2fsprogs;
* ``--read-only``: the guest sees a read-only disk it can read but not change;
* a pause and resume of the whole VM (as for a snapshot or a migration) in the
  middle of the guest's I/O: QEMU stops the device and restarts its queues
  where they were.

The guest runs e2fsprogs' ``mke2fs`` and ``e2fsck`` and util-linux's
``blkdiscard`` (busybox's cannot write zeroes) copied from the host with their
libraries.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from outboard.testing.guest import (
    DEFAULT_MODULES,
    BackendProcess,
    Guest,
    GuestFile,
    GuestResult,
    GuestUnavailable,
    host_binary_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
SERIAL = "outboard-e2e"
NUM_QUEUES = 2
CPUS = 2

#: ext4 and what it needs at mount time (its checksums use the crc32c cipher,
#: which the guest cannot load on demand).
BLK_MODULES = (*DEFAULT_MODULES, "ext4", "crc32c_generic")
HOST_PROGRAMS = ("mke2fs", "e2fsck", "blkdiscard")

_TAIL = 3000


@pytest.fixture(scope="module")
def blk_guest(guest: Guest) -> Guest:
    """The test guest plus ext4 and the host's e2fsprogs and blkdiscard."""
    try:
        return Guest(modules=BLK_MODULES, host_binaries=HOST_PROGRAMS)
    except GuestUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the blk test guest under CI: {exc}")
        pytest.skip(f"cannot build the blk test guest: {exc} (run scripts/install-test-deps)")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse raw image of :data:`IMAGE_SIZE` bytes, all zeros."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@dataclasses.dataclass
class BlkRun:
    """A guest run against the blk back-end, and what the back-end logged."""

    result: GuestResult
    stderr: str

    def details(self) -> str:
        return (
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

    def check(self, condition: bool, message: str) -> None:
        """Fail with ``message`` and everything the guest and back-end printed."""
        if not condition:
            pytest.fail(f"{message}\n{self.details()}", pytrace=False)


def _tail(text: str, limit: int = _TAIL) -> str:
    text = text.rstrip()
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def run_blk(
    guest: Guest,
    image: Path,
    socket_dir: Path,
    script: str,
    backend_args: Sequence[str] = (),
    *,
    qemu_args: Sequence[str] = (),
    files: Mapping[str, GuestFile] | None = None,
    timeout: float = 240,
) -> BlkRun:
    """Serve ``image`` with ``outboard blk``, boot the guest on it and run ``script``.

    ``qemu_args`` are more QEMU arguments (besides the disk's); ``files`` go into
    the guest as for :meth:`Guest.run`.

    The back-end is stopped (SIGTERM) before returning, so the image is no longer
    written to; it must exit cleanly and log no traceback. The script's exit
    status is checked as well.
    """
    socket_path = socket_dir / "blk.sock"
    backend = BackendProcess(
        [
            "blk",
            "--socket-path", str(socket_path),
            "--blk-file", str(image),
            "--num-queues", str(NUM_QUEUES),
            *backend_args,
        ]
    )  # fmt: skip
    try:
        with backend:
            result = guest.run(
                script,
                cpus=CPUS,
                timeout=timeout,
                files=files,
                qemu_args=[
                    "-chardev", f"socket,id=blk0,path={socket_path}",
                    "-device", f"vhost-user-blk-pci,chardev=blk0,num-queues={NUM_QUEUES}",
                    *qemu_args,
                ],
            )  # fmt: skip
            code = backend.terminate(timeout=10)
    finally:
        print(f"back-end stderr:\n{backend.stderr}")  # shown by pytest when the test fails
    run = BlkRun(result, backend.stderr)
    run.check(result.status == 0, f"the guest script exited with status {result.status}")
    run.check("Traceback" not in run.stderr, "the back-end logged a traceback")
    run.check(code == 0, f"the back-end exited with {code} on SIGTERM")
    print(f"guest ran for {result.duration:.1f} s")
    return run


def read_range(image: Path, offset: int, length: int) -> bytes:
    with image.open("rb") as f:
        f.seek(offset)
        data = f.read(length)
    assert len(data) == length, f"{image} is shorter than {offset + length} bytes"
    return data


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def request_queue_interrupts(proc_interrupts: str) -> dict[str, int]:
    """Interrupts per virtio-blk request queue vector (``virtioN-req.M``), all CPUs."""
    counts: dict[str, int] = {}
    for line in proc_interrupts.splitlines():
        words = line.split()
        if not words or not re.fullmatch(r"virtio\d+-req\.\d+", words[-1]):
            continue
        per_cpu = [int(w) for w in words[1:] if w.isdigit()][:CPUS]
        counts[words[-1]] = sum(per_cpu)
    return counts


def test_host_programs_come_with_their_loader_and_libraries() -> None:
    try:
        files = host_binary_files(HOST_PROGRAMS)
    except GuestUnavailable as exc:
        pytest.skip(f"host programs missing: {exc}")
    names = {Path(name).name for name in files}
    assert set(HOST_PROGRAMS) <= names, files
    assert any(name.startswith("ld-linux") for name in names), files
    assert any(name.startswith("libc.so") for name in names), files
    assert any(name.startswith("libext2fs.so") for name in names), files
    for name, source in files.items():
        assert not name.startswith("/"), name
        assert source.is_file() and not source.is_symlink(), (name, source)


# --------------------------------------------------------------------------- raw device

# Regions of the disk the script uses, in MiB.
WRITER_MIB = 8  # each of the two parallel writers: [0, 8) and [8, 16)
ZERO_AT = 32  # [32, 36): data, then a discard of [32, 33) and write-zeroes of [34, 35)
FLUSH_AT = 48  # [48, 49): a buffered write followed by fsync

RAW_SCRIPT = rf"""
set -e
dev=/dev/vda
sys=/sys/block/vda
wait-for-path $dev
echo "serial: $(cat $sys/serial)"
echo "size: $(blockdev --getsize64 $dev)"
echo "ro: $(cat $sys/ro)"
echo "mq: $(ls $sys/mq | tr '\n' ' ')"
echo "discard_max_bytes: $(cat $sys/queue/discard_max_bytes)"
echo "write_zeroes_max_bytes: $(cat $sys/queue/write_zeroes_max_bytes)"
stat_field() {{ awk -v n="$1" '{{ print $n }}' $sys/stat; }}
same() {{ cmp -s "$@" && echo same || echo different; }}

# 1. Two direct writers at once, one per vCPU (so one per request queue), then
#    each region read back through the other queue.
dd if=/dev/urandom of=/tmp/a bs=1M count={WRITER_MIB} 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count={WRITER_MIB} 2>/dev/null
echo "interrupts-before:"
grep -- '-req\.' /proc/interrupts
taskset -c 0 dd if=/tmp/a of=$dev bs=64k oflag=direct 2>/tmp/a.log &
writer_a=$!
taskset -c 1 dd if=/tmp/b of=$dev bs=64k seek=$(({WRITER_MIB} * 16)) oflag=direct 2>/tmp/b.log &
writer_b=$!
status_a=0; wait $writer_a || status_a=$?
status_b=0; wait $writer_b || status_b=$?
echo "writers: $status_a $status_b"
[ $status_a = 0 ] || cat /tmp/a.log
[ $status_b = 0 ] || cat /tmp/b.log
echo "interrupts-after:"
grep -- '-req\.' /proc/interrupts
echo "end-interrupts"
taskset -c 1 dd if=$dev of=/tmp/a.back bs=64k count=$(({WRITER_MIB} * 16)) iflag=direct 2>/dev/null
taskset -c 0 dd if=$dev of=/tmp/b.back bs=64k skip=$(({WRITER_MIB} * 16)) \
    count=$(({WRITER_MIB} * 16)) iflag=direct 2>/dev/null
echo "readback-a: $(same /tmp/a /tmp/a.back)"
echo "readback-b: $(same /tmp/b /tmp/b.back)"
echo "written-md5: $(cat /tmp/a /tmp/b | md5sum | cut -d' ' -f1)"
echo "device-md5: $(dd if=$dev bs=1M count=$((2 * {WRITER_MIB})) iflag=direct 2>/dev/null \
    | md5sum | cut -d' ' -f1)"

# 3. Discard [32, 33) MiB and write zeroes over [34, 35) MiB of 4 MiB of data.
discards_before=$(stat_field 12)
dd if=/dev/urandom of=/tmp/z bs=1M count=4 2>/dev/null
dd if=/tmp/z of=$dev bs=1M seek={ZERO_AT} oflag=direct 2>/dev/null
blkdiscard -f -o $(({ZERO_AT} * 1048576)) -l 1048576 $dev
blkdiscard -f -z -o $((({ZERO_AT} + 2) * 1048576)) -l 1048576 $dev
dd if=$dev of=/tmp/z.back bs=1M skip={ZERO_AT} count=4 iflag=direct 2>/dev/null
echo "discarded-is-zero: $(same -n 1048576 /tmp/z.back /dev/zero)"
echo "write-zeroes-is-zero: $(same -n 1048576 /tmp/z.back /dev/zero 2097152 0)"
echo "kept-1: $(same -n 1048576 /tmp/z.back /tmp/z 1048576 1048576)"
echo "kept-3: $(same -n 1048576 /tmp/z.back /tmp/z 3145728 3145728)"
echo "zero-region-md5: $(md5sum < /tmp/z.back | cut -d' ' -f1)"
echo "discards: $discards_before $(stat_field 12)"

# 4. The write cache: write back, a buffered write and fsync (a flush), then
#    write through.
echo "write back" > $sys/cache_type
echo "cache-write-back: $(cat $sys/cache_type)"
flushes_before=$(stat_field 16)
dd if=/tmp/z of=$dev bs=1M count=1 seek={FLUSH_AT} conv=fsync 2>/dev/null
sync
echo "flushes: $flushes_before $(stat_field 16)"
echo "flushed-md5: $(dd if=$dev bs=1M count=1 skip={FLUSH_AT} iflag=direct 2>/dev/null \
    | md5sum | cut -d' ' -f1)"
echo "write through" > $sys/cache_type
echo "cache-write-through: $(cat $sys/cache_type)"
dd if=/tmp/z of=$dev bs=1M count=1 seek=$(({FLUSH_AT} + 1)) skip=1 conv=fsync 2>/dev/null
echo "write-through-md5: $(dd if=$dev bs=1M count=1 skip=$(({FLUSH_AT} + 1)) iflag=direct \
    2>/dev/null | md5sum | cut -d' ' -f1)"
echo "done: raw"
"""


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "queue-processes"])
def test_raw_io_over_two_queues_discard_flush_and_serial(
    blk_guest: Guest, image: Path, short_tmp: Path, processes: bool
) -> None:
    options = ["--serial", SERIAL] + (["--queue-processes"] if processes else [])
    run = run_blk(blk_guest, image, short_tmp, RAW_SCRIPT, options)
    check, field = run.check, run.field
    check(field("done") == "raw", "the guest script did not get to its end")
    if processes:
        served = set(re.findall(r"queue (\d+): served by process", run.stderr))
        check(served == {str(i) for i in range(NUM_QUEUES)},
              f"queues served by processes of their own: {sorted(served)}")

    # 6. the serial number and what the disk looks like
    check(field("serial") == SERIAL, f"serial is {field('serial')!r}, not {SERIAL!r}")
    check(int(field("size")) == IMAGE_SIZE, f"disk size {field('size')} != {IMAGE_SIZE}")
    check(field("ro") == "0", "the disk is read-only without --read-only")
    check(
        field("mq").split() == [str(i) for i in range(NUM_QUEUES)],
        f"the disk has hardware queues {field('mq')!r}, expected {NUM_QUEUES}",
    )
    check(int(field("discard_max_bytes")) > 0, "discard is not enabled")
    check(int(field("write_zeroes_max_bytes")) > 0, "write-zeroes is not enabled")

    # 1. integrity over both queues
    check(field("writers") == "0 0", f"a direct writer failed: {field('writers')}")
    check(field("readback-a") == "same", "the first writer's data read back differently")
    check(field("readback-b") == "same", "the second writer's data read back differently")
    written = field("written-md5")
    check(field("device-md5") == written, "the device does not hold what was written")
    host = md5(read_range(image, 0, 2 * WRITER_MIB * MiB))
    check(host == written, f"the image holds md5 {host}, the guest wrote {written}")

    before_text, _, rest = run.result.output.partition("interrupts-after:")
    before = request_queue_interrupts(before_text.partition("interrupts-before:")[2])
    after = request_queue_interrupts(rest.partition("end-interrupts")[0])
    print(f"request-queue interrupts before the writers: {before}, after: {after}")
    check(len(after) == NUM_QUEUES, f"expected {NUM_QUEUES} request-queue vectors: {after}")
    for name, count in after.items():
        check(
            count > before.get(name, 0),
            f"no interrupts on {name} while the two writers ran: {before} -> {after}",
        )

    # 3. discard and write-zeroes
    check(field("discarded-is-zero") == "same", "a discarded range does not read back as zeros")
    check(
        field("write-zeroes-is-zero") == "same", "a write-zeroes range does not read back as zeros"
    )
    check(field("kept-1") == "same", "data next to a discard changed")
    check(field("kept-3") == "same", "data next to a write-zeroes changed")
    discards = [int(n) for n in field("discards").split()]
    check(discards[1] > discards[0], f"no discard reached the disk: {discards}")
    region = read_range(image, ZERO_AT * MiB, 4 * MiB)
    check(region[:MiB] == bytes(MiB), "the discarded range is not zero in the image")
    check(region[2 * MiB : 3 * MiB] == bytes(MiB), "the write-zeroes range is not zero on the host")
    check(
        md5(region) == field("zero-region-md5"),
        "the image's discard/write-zeroes region differs from what the guest read",
    )

    # 4. write cache and flushes
    check(field("cache-write-back") == "write back", "cache_type did not switch to write back")
    check(
        field("cache-write-through") == "write through",
        "cache_type did not switch to write through",
    )
    flushes = [int(n) for n in field("flushes").split()]
    check(flushes[1] > flushes[0], f"fsync in write-back mode sent no flush: {flushes}")
    check(
        md5(read_range(image, FLUSH_AT * MiB, MiB)) == field("flushed-md5"),
        "the flushed write is not in the image",
    )
    check(
        md5(read_range(image, (FLUSH_AT + 1) * MiB, MiB)) == field("write-through-md5"),
        "the write-through write is not in the image",
    )
    check("write through" in run.stderr, "the back-end did not log the switch to write through")


# --------------------------------------------------------------------------- ext4

NUM_FILES = 200
NUM_DIRS = 10
MAX_FILE_SIZE = 96 * 1024
#: Directories the guest deletes again (on a file system mounted with online
#: discard), so that the freed blocks are discarded.
DELETED_DIRS = ("d0", "d1", "d2")

EXT4_SCRIPT = rf"""
set -e
dev=/dev/vda
wait-for-path $dev
echo "cache-type: $(cat /sys/block/vda/cache_type)"
mke2fs -q -F -t ext4 -L outboard $dev
mkdir -p /mnt/disk
mount -t ext4 -o discard $dev /mnt/disk
mkdir /mnt/disk/data
tar -xf /root/files.tar -C /mnt/disk/data
echo "files: $(find /mnt/disk/data -type f | wc -l)"
sync
cd /mnt/disk/data
rm -r {" ".join(DELETED_DIRS)}
cd /
echo "files-kept: $(find /mnt/disk/data -type f | wc -l)"
umount /mnt/disk
status=0
e2fsck -fn $dev || status=$?
echo "fsck-status: $status"
mount -t ext4 -o ro $dev /mnt/disk
cd /mnt/disk/data
md5sum -c -s /root/kept.md5 && echo "reread: same" || echo "reread: different"
cd /
umount /mnt/disk
echo "done: ext4"
"""


def make_files(tmp_path: Path, *, count: int = NUM_FILES, dirs: int = NUM_DIRS,
               max_size: int = MAX_FILE_SIZE, seed: int = 7) -> tuple[Path, dict[str, bytes]]:
    """A tar of ``count`` files of random sizes in ``dirs`` dirs, and the files."""
    rng = random.Random(seed)
    files = {
        f"d{i % dirs}/f{i}": rng.randbytes(rng.randint(1, max_size))
        for i in range(count)
    }
    path = tmp_path / "files.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path, files


def _o_direct_works(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def test_ext4_file_system_stays_consistent(
    blk_guest: Guest, image: Path, short_tmp: Path, tmp_path: Path
) -> None:
    tar_path, files = make_files(tmp_path)
    kept = {name: data for name, data in files.items() if name.split("/")[0] not in DELETED_DIRS}
    kept_sums = "".join(f"{md5(data)}  {name}\n" for name, data in kept.items())
    # Write-through, and direct host I/O when the image's file system allows it
    # (tmpfs before Linux 6.6 does not).
    args = ["--write-through"]
    if _o_direct_works(image):
        args.append("--direct")
    print(f"back-end options: {args}")
    run = run_blk(
        blk_guest,
        image,
        short_tmp,
        EXT4_SCRIPT,
        args,
        files={"root/files.tar": tar_path, "root/kept.md5": kept_sums},
    )
    check, field = run.check, run.field
    check(field("done") == "ext4", "the guest script did not get to its end")
    check(field("cache-type") == "write through", "--write-through is not what the guest sees")
    check(int(field("files")) == NUM_FILES, f"{field('files')} files written, not {NUM_FILES}")
    check(int(field("files-kept")) == len(kept), f"{field('files-kept')} files left after rm")
    check(field("fsck-status") == "0", "e2fsck -fn found problems in the guest")
    check(field("reread") == "same", "the files read back differently after a remount")

    # The host's view of the same image: a clean file system with the same files.
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    e2fsck, debugfs = shutil.which("e2fsck", path=search), shutil.which("debugfs", path=search)
    assert e2fsck is not None and debugfs is not None, "e2fsprogs vanished from the host"
    fsck = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    check(
        fsck.returncode == 0,
        f"host e2fsck -fn exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}",
    )
    dump = tmp_path / "dump"
    dump.mkdir()
    unpacked = subprocess.run(
        [debugfs, "-R", f"rdump /data {dump}", str(image)], capture_output=True, text=True
    )
    check(unpacked.returncode == 0, f"debugfs rdump failed:\n{unpacked.stderr}")
    on_host = {
        path.relative_to(dump / "data").as_posix(): path.read_bytes()
        for path in (dump / "data").rglob("*")
        if path.is_file()
    }
    missing, extra = sorted(set(kept) - set(on_host)), sorted(set(on_host) - set(kept))
    check(
        not missing and not extra,
        f"the image holds {len(on_host)} files, expected {len(kept)}: "
        f"missing {missing[:5]}, unexpected {extra[:5]}",
    )
    differing = sorted(name for name, data in kept.items() if on_host[name] != data)
    check(not differing, f"{len(differing)} files differ in the image, first: {differing[:5]}")


# --------------------------------------------------------------------------- read-only

RO_SCRIPT = r"""
dev=/dev/vda
wait-for-path $dev || exit 1
echo "ro: $(cat /sys/block/vda/ro)"
echo "discard_max_bytes: $(cat /sys/block/vda/queue/discard_max_bytes)"
echo "read-md5: $(dd if=$dev bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
if dd if=/dev/zero of=$dev bs=4096 count=1 oflag=direct 2>/tmp/err; then
    echo "write: succeeded"
else
    echo "write: failed"
    cat /tmp/err
fi
if blkdiscard -f -o 0 -l 1048576 $dev 2>/tmp/err; then
    echo "discard: succeeded"
else
    echo "discard: failed"
    cat /tmp/err
fi
echo "done: ro"
"""


def test_read_only_disk_cannot_be_changed(blk_guest: Guest, image: Path, short_tmp: Path) -> None:
    content = os.urandom(MiB)
    with image.open("r+b") as f:
        f.write(content)
    before = md5(image.read_bytes())
    run = run_blk(blk_guest, image, short_tmp, RO_SCRIPT, ["--read-only"])
    check, field = run.check, run.field
    check(field("done") == "ro", "the guest script did not get to its end")
    check(field("ro") == "1", "the guest does not see a read-only disk")
    check(field("read-md5") == md5(content), "the guest read something else than the image")
    check(field("write") == "failed", "a write to the read-only disk succeeded in the guest")
    check(field("discard") == "failed", "a discard of the read-only disk succeeded in the guest")
    check(md5(image.read_bytes()) == before, "the read-only image changed")


# --------------------------------------------------------------------------- VM pause

# The guest asks to be paused by reporting a panic to QEMU's pvpanic device
# (I/O port 0x505) with ``-action panic=pause``; the test resumes it over QMP as
# soon as QEMU reports the pause. Stopping the VM stops the vhost-user device
# (GET_VRING_BASE) and resuming starts it again at the bases QEMU got back.
PVPANIC_PORT = 0x505

PAUSE_SCRIPT = rf"""
set -e
dev=/dev/vda
wait-for-path $dev
dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null
dd if=/tmp/a of=$dev bs=64k oflag=direct 2>/dev/null
echo "before-pause: written"
printf '\001' | dd of=/dev/port bs=1 seek={PVPANIC_PORT} 2>/dev/null
echo "after-pause: running"
status=0
timeout 20 dd if=/tmp/a of=$dev bs=64k seek=16 oflag=direct 2>/tmp/err || status=$?
echo "write-after-pause: $status"
[ $status = 0 ] || cat /tmp/err
status=0
timeout 20 dd if=$dev of=/tmp/b bs=64k count=32 iflag=direct 2>/tmp/err || status=$?
echo "read-after-pause: $status"
[ $status = 0 ] || cat /tmp/err
cat /tmp/a /tmp/a | cmp -s - /tmp/b && echo "readback: same" || echo "readback: different"
echo "kernel-complaints: $(dmesg | grep -c -i -e 'not a head' -e 'I/O error' || true)"
dmesg | grep -i -e 'not a head' -e 'I/O error' | head -5 || true
echo "done: pause"
"""


class QmpResumer(threading.Thread):
    """Listens for QEMU's QMP connection and resumes the VM whenever the guest
    reports a panic (which pauses it). Every message QEMU sends is kept."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__(name="qmp-resumer", daemon=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(socket_path))
        self.server.listen(1)
        self.server.settimeout(timeout)
        self.timeout = timeout
        self.messages: list[dict[str, object]] = []
        self.error: BaseException | None = None

    def qemu_args(self, chardev_path: Path) -> list[str]:
        return [
            "-chardev", f"socket,id=qmp,path={chardev_path}",
            "-mon", "chardev=qmp,mode=control",
            "-device", f"pvpanic,ioport={PVPANIC_PORT}",
            "-action", "panic=pause",
        ]  # fmt: skip

    @property
    def events(self) -> list[str]:
        return [str(m["event"]) for m in self.messages if "event" in m]

    def run(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError as exc:
            self.error = exc
            return
        finally:
            self.server.close()
        conn.settimeout(self.timeout)
        with conn, conn.makefile("rw", encoding="utf-8") as stream:

            def send(command: str) -> None:
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()

            try:
                send("qmp_capabilities")
                for line in stream:
                    message = json.loads(line)
                    self.messages.append(message)
                    if message.get("event") == "GUEST_PANICKED":
                        send("cont")
            except (OSError, ValueError) as exc:
                self.error = exc


def test_vm_pause_and_resume_keeps_the_disk_working(
    blk_guest: Guest, image: Path, short_tmp: Path
) -> None:
    qmp_socket = short_tmp / "qmp.sock"
    resumer = QmpResumer(qmp_socket, timeout=120)
    resumer.start()
    try:
        run = run_blk(
            blk_guest,
            image,
            short_tmp,
            PAUSE_SCRIPT,
            qemu_args=resumer.qemu_args(qmp_socket),
            timeout=120,
        )
    finally:
        resumer.join(10)
    print(f"QMP events: {resumer.events}")
    check, field = run.check, run.field
    check(resumer.error is None, f"the QMP connection failed: {resumer.error!r}")
    check(
        "GUEST_PANICKED" in resumer.events and "RESUME" in resumer.events,
        f"the VM was not paused and resumed; QMP events: {resumer.events}",
    )
    check(field("done") == "pause", "the guest script did not get to its end")
    check(field("write-after-pause") == "0", "a write after the pause failed")
    check(field("read-after-pause") == "0", "a read after the pause failed")
    check(field("readback") == "same", "the disk does not hold what was written around the pause")
    check(
        field("kernel-complaints") == "0",
        "the guest's virtio-blk driver saw bad completions after the pause",
    )
    check(
        md5(read_range(image, 0, 2 * MiB)) == md5(2 * read_range(image, 0, MiB)),
        "the image does not hold the data written before and after the pause",
    )
