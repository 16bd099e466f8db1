"""virtio-blk (device id 2) over a raw image file or a block device.

Data moves with preadv/pwritev straight between the image and guest memory.
Each batch of requests (one drain of the ring) is executed in ring order; in
write-through mode the batch's writes reach the disk with one fdatasync before
any of their statuses is written (virtio 1.2, 5.2.6 "Device Operation").
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Sequence

from ..backend import (
    DeviceError,
    GuestMemory,
    QueueSpec,
    SplitQueue,
    VirtioDevice,
    VirtioDeviceId,
    bit,
)
from ..backend.virtqueue import Chain

__all__ = ["BlkDevice", "BlkFeature", "BlkStatus", "BlkType"]

log = logging.getLogger("outboard.blk")

SECTOR = 512
MAX_SEGMENT_SIZE = 1 << 20  # size_max
DISCARD_MAX_SECTORS = 1 << 22  # 2 GiB
DISCARD_MAX_SEG = 32
WRITE_ZEROES_MAX_SECTORS = 1 << 22
WRITE_ZEROES_MAX_SEG = 32
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES


EPILOG = """\
attach to QEMU (guest RAM must be shared):
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=blk0,path=SOCKET
  -device vhost-user-blk-pci,chardev=blk0,num-queues=N
"""


class BlkFeature:
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class BlkType:
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus:
    OK = 0
    IOERR = 1
    UNSUPP = 2


# struct virtio_blk_config (include/uapi/linux/virtio_blk.h), little-endian.
_config = struct.Struct("<QIIHBBI BBHI BBH IIIIIB3x III")
CONFIG_SIZE = _config.size
WRITEBACK_OFFSET = 32
assert CONFIG_SIZE == 72, CONFIG_SIZE

_header = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
_desc = struct.Struct("<QIHH")  # addr, len, flags, next
_table3 = struct.Struct("<QIHH QIHH QIHH")  # an indirect table of three descriptors
_segment = struct.Struct("<QII")  # sector, num_sectors, flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# fallocate(2) and the block-device ioctls, for discard and write-zeroes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlkDevice(VirtioDevice):
    device_id = VirtioDeviceId.BLOCK
    type_name = "block"

    def __init__(self, path: str, *, read_only: bool = False, num_queues: int = 1,
                 queue_size: int = 256, serial: str = "", direct: bool = False,
                 writeback: bool = True) -> None:
        super().__init__()
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        self.path = path
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            mode = os.fstat(self.fd).st_mode
            self.is_block_device = stat.S_ISBLK(mode)
            if self.is_block_device:
                buf = bytearray(8)
                fcntl.ioctl(self.fd, BLKGETSIZE64, buf)
                size = int.from_bytes(buf, "little")
            else:
                size = os.fstat(self.fd).st_size
        except BaseException:
            os.close(self.fd)
            raise
        if num_queues < 1:
            os.close(self.fd)
            raise ValueError("--num-queues must be at least 1")
        self.size = size
        self.capacity = size // SECTOR
        self.read_only = read_only
        self.direct = direct
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.serial = serial.encode()[:ID_BYTES]
        self.default_writeback = writeback
        self.writeback = writeback
        self.features = (
            bit(BlkFeature.SIZE_MAX) | bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE)
            | bit(BlkFeature.FLUSH) | bit(BlkFeature.TOPOLOGY) | bit(BlkFeature.CONFIG_WCE)
            | bit(BlkFeature.MQ)
        )
        if read_only:
            self.features |= bit(BlkFeature.RO)
        else:
            self.features |= bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES)
        self.stats = {"read": 0, "write": 0, "flush": 0, "discard": 0, "write_zeroes": 0,
                      "get_id": 0, "ioerr": 0, "unsupp": 0}

    # -- the device API ----------------------------------------------------

    @property
    def queues(self) -> Sequence[QueueSpec]:
        return tuple(QueueSpec(f"request.{i}", self.queue_size) for i in range(self.num_queues))

    def config(self) -> bytes:
        return _config.pack(
            self.capacity,                          # capacity
            MAX_SEGMENT_SIZE,                       # size_max
            self.queue_size - 2,                    # seg_max
            0, 0, 0,                                # geometry
            SECTOR,                                 # blk_size
            0, 0, 1, 0,                             # topology: exp, offset, min_io, opt_io
            int(self.writeback), 0,                 # writeback, unused0
            self.num_queues,                        # num_queues
            DISCARD_MAX_SECTORS, DISCARD_MAX_SEG, 1,  # discard: max sectors, seg, alignment
            WRITE_ZEROES_MAX_SECTORS, WRITE_ZEROES_MAX_SEG, 1,  # write zeroes (+ may unmap)
            0, 0, 0,                                # secure erase: not offered
        )

    def write_config(self, offset: int, data: bytes) -> None:
        # Only the writeback byte is writable, and only with CONFIG_WCE (5.2.4).
        if offset == WRITEBACK_OFFSET and len(data) == 1 and data[0] in (0, 1):
            if not self.has_feature(BlkFeature.CONFIG_WCE):
                raise DeviceError("writeback toggled without VIRTIO_BLK_F_CONFIG_WCE")
            self.writeback = bool(data[0])
            log.info("cache mode: %s", "write back" if self.writeback else "write through")
            return
        raise DeviceError(f"config write of {len(data)} bytes at {offset} is not allowed")

    def activate(self, features: int) -> None:
        super().activate(features)
        # Without CONFIG_WCE the driver cannot flip the mode; without FLUSH it
        # cannot flush, so a cache would be unsafe: write through (5.2.5.1).
        if not features >> BlkFeature.FLUSH & 1:
            self.writeback = False

    def reset(self) -> None:
        super().reset()
        self.writeback = self.default_writeback

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def queue_fds(self) -> Sequence[int]:
        return (self.fd,)

    # -- requests ----------------------------------------------------------

    def process(self, queue: SplitQueue) -> None:
        limit = queue.batch_limit
        done = self._serve_common(queue, limit)
        if done < limit:
            chains = queue.pop_batch(limit - done)
            if chains:
                self._serve_chains(queue, chains)

    def _serve_common(self, queue: SplitQueue, limit: int) -> int:
        """Serve up to ``limit`` requests of the shape Linux's driver sends, straight
        from the rings; stop at the first other chain (or any doubt) and return
        how many were served. No objects per request: one unpack for the
        descriptor, one for an indirect table of three (header, data, status),
        one for the header, the preadv or pwritev, the status byte and the used
        entry. Reads, and writes in write-back mode, only: everything else, and
        any chain this path does not like, goes through ``pop_batch`` and
        ``_serve_chains``, which check and name every fault.
        """
        views = queue.ring_views()
        memory = queue.memory
        if views is None or memory is None or queue.broken:
            return 0
        avail, desc, used_b = views
        size = queue.size
        last = queue.last_avail_idx
        pending = (avail[1] - last) & 0xFFFF
        if not pending or pending > size:
            return 0  # empty, or a bad index that pop_batch reports
        mask = size - 1
        used = used_b[:4 + 8 * size].cast("I")  # entry i: id at 1 + 2i, len at 2 + 2i
        used_idx = queue.used_idx
        region = memory.last_region()
        r_gpa, r_size, r_view = region.spec.gpa, region.spec.size, region.view
        indirect_ok = queue.indirect
        writes_ok = self.writeback and not self.read_only
        fd = self.fd
        capacity = self.capacity
        unpack_desc = _desc.unpack_from
        unpack_table = _table3.unpack_from
        unpack_header = _header.unpack_from
        preadv = os.preadv
        pwritev = os.pwritev
        served = reads = 0
        try:
            while served < limit and served < pending:
                head = avail[2 + (last & mask)]
                if head >= size:
                    break
                addr, length, flags, nxt = unpack_desc(desc, head << 4)
                if flags == 4 and length != 48:
                    # An indirect table of more segments: header, data..., status.
                    done = self._serve_segments(memory, addr, length, writes_ok) \
                        if indirect_ok else None
                    if done is None:
                        break
                    written, status_view, status, is_read = done
                    reads += is_read
                else:
                    if flags == 4:  # VIRTQ_DESC_F_INDIRECT: a table of exactly three
                        if not indirect_ok:
                            break
                        offset = addr - r_gpa
                        if offset < 0 or offset + 48 > r_size:
                            if (found := memory.region_of(addr, 48)) is None:
                                break
                            r_gpa, r_size, r_view = found.spec.gpa, found.spec.size, found.view
                            offset = addr - r_gpa
                        (a0, l0, f0, n0, a1, l1, f1, n1,
                         a2, l2, f2, _) = unpack_table(r_view, offset)
                        if n0 != 1 or n1 != 2:
                            break
                    elif flags == 1 and nxt < size:  # VIRTQ_DESC_F_NEXT: a chain in the ring
                        a0, l0, f0 = addr, length, flags
                        a1, l1, f1, n1 = unpack_desc(desc, nxt << 4)
                        if n1 >= size:
                            break
                        a2, l2, f2, _ = unpack_desc(desc, n1 << 4)
                    else:
                        break
                    # header (readable, NEXT), data (NEXT, +WRITE for a read), status
                    # (one writable byte, last); each inside one region, mostly the last.
                    if f0 != 1 or l0 != 16 or f2 != 2 or l2 != 1 or not l1 or l1 & 511:
                        break
                    offset = a0 - r_gpa
                    if offset < 0 or offset + 16 > r_size:
                        if (found := memory.region_of(a0, 16)) is None:
                            break
                        r_gpa, r_size, r_view = found.spec.gpa, found.spec.size, found.view
                        offset = a0 - r_gpa
                    kind, _, sector = unpack_header(r_view, offset)
                    if sector + (l1 >> 9) > capacity:
                        break
                    offset = a1 - r_gpa
                    if offset < 0 or offset + l1 > r_size:
                        if (found := memory.region_of(a1, l1)) is None:
                            break
                        r_gpa, r_size, r_view = found.spec.gpa, found.spec.size, found.view
                        offset = a1 - r_gpa
                    data = r_view[offset:offset + l1]
                    status = a2 - r_gpa
                    if status < 0 or status >= r_size:
                        if (found := memory.region_of(a2, 1)) is None:
                            break
                        r_gpa, r_size, r_view = found.spec.gpa, found.spec.size, found.view
                        status = a2 - r_gpa
                    status_view = r_view
                    if kind == 0 and f1 == 3:
                        if preadv(fd, (data,), sector << 9) != l1:
                            break
                        written = l1 + 1
                        reads += 1
                    elif kind == 1 and f1 == 1 and writes_ok:
                        if pwritev(fd, (data,), sector << 9) != l1:
                            break
                        written = 1
                    else:
                        break
                # A short or failed transfer left the request in the ring: the
                # general path does it again and reports the error.
                status_view[status] = 0
                slot = (used_idx & mask) << 1
                used[slot + 1] = head
                used[slot + 2] = written
                used_idx += 1
                last += 1
                served += 1
        except OSError:
            pass
        finally:
            used.release()
        queue.last_avail_idx = last & 0xFFFF
        queue.used_idx = used_idx & 0xFFFF
        stats = self.stats
        stats["read"] += reads
        stats["write"] += served - reads
        return served

    def _serve_segments(self, memory: GuestMemory, gpa: int, length: int, writes_ok: bool,
                        ) -> tuple[int, memoryview, int, int] | None:
        """A read or write of several data segments in one indirect table at
        ``gpa`` (``length`` bytes): done, and (bytes written, the status byte's
        region view and offset, 1 if it was a read); None (nothing done, or a
        short transfer to do again) for anything the general path must see."""
        count = length >> 4
        if (length & 15 or not 4 <= count <= self.queue_size
                or (table := memory.region_of(gpa, length)) is None):
            return None
        offset = gpa - table.spec.gpa
        entries = list(_desc.iter_unpack(table.view[offset:offset + length]))
        hdr_gpa, hdr_len, hdr_flags, hdr_next = entries[0]
        status_gpa, status_len, status_flags, _ = entries[-1]
        data_flags = entries[1][2]
        if (hdr_flags != 1 or hdr_len != 16 or hdr_next != 1 or status_flags != 2
                or status_len != 1 or data_flags not in (1, 3)):
            return None
        buffers: list[memoryview] = []
        total = 0
        for index in range(1, count - 1):
            seg_gpa, seg_len, seg_flags, seg_next = entries[index]
            if seg_flags != data_flags or seg_next != index + 1 or not seg_len:
                return None
            if (region := memory.region_of(seg_gpa, seg_len)) is None:
                return None
            start = seg_gpa - region.spec.gpa
            buffers.append(region.view[start:start + seg_len])
            total += seg_len
        header = memory.region_of(hdr_gpa, 16)
        status = memory.region_of(status_gpa, 1)
        if total & 511 or header is None or status is None:
            return None
        kind, _, sector = _header.unpack_from(header.view, hdr_gpa - header.spec.gpa)
        if sector + (total >> 9) > self.capacity:
            return None
        if kind == BlkType.IN and data_flags == 3:
            if os.preadv(self.fd, buffers, sector << 9) != total:
                return None
            return total + 1, status.view, status_gpa - status.spec.gpa, 1
        if kind == BlkType.OUT and data_flags == 1 and writes_ok:
            if os.pwritev(self.fd, buffers, sector << 9) != total:
                return None
            return 1, status.view, status_gpa - status.spec.gpa, 0
        return None

    def _serve_chains(self, queue: SplitQueue, chains: list[Chain]) -> None:
        """The general path: any request shape, any type, one fdatasync per batch
        in write-through mode."""
        push = queue.push_head
        stats = self.stats
        done: list[tuple[Chain, memoryview | None, int, int, bool]] = []
        unsynced = False
        for chain in chains:
            status_view, status_code, written, wrote = self._execute(chain)
            unsynced |= wrote
            done.append((chain, status_view, status_code, written, wrote))
        if unsynced and not self.writeback:
            # Write-through: the batch's writes are on disk before any status is.
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                log.error("fdatasync failed: %s", exc)
                done = [(c, v, BlkStatus.IOERR if w else s, n, w) for c, v, s, n, w in done]
        for chain, status_view, status_code, written, _ in done:
            if status_view is not None:
                status_view[0] = status_code
                written += 1
            if status_code == BlkStatus.IOERR:
                stats["ioerr"] += 1
            elif status_code == BlkStatus.UNSUPP:
                stats["unsupp"] += 1
            push(chain.head, written)

    def _execute(self, chain: Chain) -> tuple[memoryview | None, int, int, bool]:
        """Run one request: (status byte, status, bytes written, whether it wrote)."""
        writable = chain.writable
        if not writable:
            log.warning("request without a status byte (head %d)", chain.head)
            return None, BlkStatus.IOERR, 0, False
        last = writable[-1]
        status_view = last[len(last) - 1:]
        data_in = writable[:-1]
        if len(last) > 1:
            data_in.append(last[:len(last) - 1])
        head = _head_bytes(chain)
        if len(head) < _header.size:
            log.warning("request header of %d bytes (head %d)", len(head), chain.head)
            return status_view, BlkStatus.IOERR, 0, False
        kind, _, sector = _header.unpack_from(head)
        try:
            if kind == BlkType.IN:
                status, written = self._read(sector, data_in)
                return status_view, status, written, False
            if kind == BlkType.OUT:
                status = self._write(sector, _readable_after_header(chain))
                return status_view, status, 0, status == BlkStatus.OK
            if kind == BlkType.FLUSH:
                return status_view, self._flush(), 0, False
            if kind == BlkType.GET_ID:
                status, written = self._get_id(data_in)
                return status_view, status, written, False
            if kind in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
                status = self._discard_or_zero(kind, _readable_after_header(chain))
                return status_view, status, 0, status == BlkStatus.OK
        except OSError as exc:
            log.error("request type %d at sector %d failed: %s", kind, sector, exc)
            return status_view, BlkStatus.IOERR, 0, False
        return status_view, BlkStatus.UNSUPP, 0, False

    def _range_ok(self, sector: int, size: int) -> bool:
        if size % SECTOR:
            log.warning("request of %d bytes is not a whole number of sectors", size)
            return False
        if sector > self.capacity or size // SECTOR > self.capacity - sector:
            log.warning("request for sectors %d+%d past the end (%d sectors)",
                        sector, size // SECTOR, self.capacity)
            return False
        return True

    def _read(self, sector: int, buffers: list[memoryview]) -> tuple[int, int]:
        size = sum(len(b) for b in buffers)
        if not self._range_ok(sector, size):
            return BlkStatus.IOERR, 0
        self.stats["read"] += 1
        _full_io(os.preadv, self.fd, buffers, sector * SECTOR, size)
        return BlkStatus.OK, size

    def _write(self, sector: int, buffers: list[memoryview]) -> int:
        if self.read_only:
            return BlkStatus.IOERR
        size = sum(len(b) for b in buffers)
        if not self._range_ok(sector, size):
            return BlkStatus.IOERR
        self.stats["write"] += 1
        _full_io(os.pwritev, self.fd, buffers, sector * SECTOR, size)
        return BlkStatus.OK

    def _flush(self) -> int:
        self.stats["flush"] += 1
        if not self.read_only:
            os.fdatasync(self.fd)
        return BlkStatus.OK

    def _get_id(self, buffers: list[memoryview]) -> tuple[int, int]:
        self.stats["get_id"] += 1
        data = self.serial.ljust(ID_BYTES, b"\0")
        written = 0
        for b in buffers:
            take = min(len(b), len(data) - written)
            b[:take] = data[written:written + take]
            written += take
        return BlkStatus.OK, written

    def _discard_or_zero(self, kind: int, buffers: list[memoryview]) -> int:
        if self.read_only:
            return BlkStatus.IOERR
        payload = b"".join(buffers)
        if not payload or len(payload) % _segment.size:
            log.warning("discard/write-zeroes payload of %d bytes", len(payload))
            return BlkStatus.IOERR
        discard = kind == BlkType.DISCARD
        count = len(payload) // _segment.size
        if count > (DISCARD_MAX_SEG if discard else WRITE_ZEROES_MAX_SEG):
            return BlkStatus.IOERR
        segments = [_segment.unpack_from(payload, i * _segment.size) for i in range(count)]
        limit = DISCARD_MAX_SECTORS if discard else WRITE_ZEROES_MAX_SECTORS
        for sector, sectors, flags in segments:
            if sectors > limit or not self._range_ok(sector, sectors * SECTOR):
                return BlkStatus.IOERR
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return BlkStatus.UNSUPP
        for sector, sectors, flags in segments:
            offset, length = sector * SECTOR, sectors * SECTOR
            if discard:
                self.stats["discard"] += 1
                self._punch(offset, length, must_zero=False)
            else:
                self.stats["write_zeroes"] += 1
                self._zero(offset, length, unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return BlkStatus.OK

    def _punch(self, offset: int, length: int, *, must_zero: bool) -> None:
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", offset, length))
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS) or must_zero:
                raise
            # A discard is a hint; a file system without holes may ignore it.

    def _zero(self, offset: int, length: int, *, unmap: bool) -> None:
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return
        modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []) + [
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            offset += os.pwrite(self.fd, zeros[:end - offset], offset)

    # -- the command line --------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--blk-file", required=False, metavar="IMG",
                            help="raw image file or block device to serve")
        parser.add_argument("--read-only", action="store_true", help="refuse writes")
        parser.add_argument("--num-queues", type=int, default=1, metavar="N",
                            help="request queues (default 1)")
        parser.add_argument("--queue-size", type=int, default=256, metavar="N",
                            help="maximum entries per queue (default 256)")
        parser.add_argument("--serial", default="", metavar="ID",
                            help="the serial number the guest reads (VIRTIO_BLK_T_GET_ID)")
        parser.add_argument("--direct", action="store_true",
                            help="open the image with O_DIRECT (bypass the host page cache)")
        parser.add_argument("--write-through", action="store_true",
                            help="start in write-through mode (the guest may switch)")
        parser.add_argument("--queue-processes", action="store_true",
                            help="serve each queue from a process of its own, so that "
                                 "queues run on several cores (vhost-user)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BlkDevice:
        if not args.blk_file:
            raise ValueError("--blk-file is required")
        if args.queue_processes and args.transport != "vhost-user":
            raise ValueError("--queue-processes is for vhost-user (vfio-user routes "
                             "interrupts through the MSI-X table in one process)")
        device = cls(args.blk_file, read_only=args.read_only, num_queues=args.num_queues,
                     queue_size=args.queue_size, serial=args.serial, direct=args.direct,
                     writeback=not args.write_through)
        device.queue_processes = args.queue_processes
        return device

    @classmethod
    def capabilities(cls) -> dict[str, object]:
        return {"type": "block", "features": ["read-only", "blk-file"]}


def _head_bytes(chain: Chain) -> bytes | memoryview:
    readable = chain.readable
    if readable and len(readable[0]) >= _header.size:
        return readable[0]
    return b"".join(readable)[:_header.size]


def _readable_after_header(chain: Chain) -> list[memoryview]:
    out: list[memoryview] = []
    skip = _header.size
    for seg in chain.readable:
        if skip >= len(seg):
            skip -= len(seg)
            continue
        out.append(seg[skip:] if skip else seg)
        skip = 0
    return out


def _full_io(call: object, fd: int, buffers: list[memoryview], offset: int, size: int) -> None:
    """preadv/pwritev until every byte moved (short transfers happen near EOF)."""
    fn = call  # os.preadv or os.pwritev
    done = fn(fd, buffers, offset)  # type: ignore[operator]
    if done == size:
        return
    while done < size:
        rest: list[memoryview] = []
        skip = done
        for b in buffers:
            if skip >= len(b):
                skip -= len(b)
                continue
            rest.append(b[skip:])
            skip = 0
        n = fn(fd, rest, offset + done)  # type: ignore[operator]
        if n <= 0:
            if fn is os.preadv:
                for b in rest:  # reading past the end of a file: zeros
                    b[:] = bytes(len(b))
                return
            raise OSError(errno.EIO, "short write")
        done += n
