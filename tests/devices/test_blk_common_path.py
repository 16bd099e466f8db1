"""The block device's straight path for common requests, against its general path.

``BlkDevice._serve_common`` reads reads and writes of the usual shape straight
from the rings; everything else must fall through to ``pop_batch`` and the
general path. Whatever the driver puts in the ring, both paths must leave the
same image, the same guest memory and the same used entries behind.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outboard.backend import GuestMemory, MemoryRegion, SplitQueue
from outboard.backend.memory import RegionSpec
from outboard.devices.blk import BlkDevice, BlkStatus
from outboard.testing import DriverQueue, GuestRam

SECTORS = 256
IMAGE = random.Random(5).randbytes(SECTORS * 512)
RAM_SIZE = 1 << 20
RING = 128
NEXT, WRITE, INDIRECT = 1, 2, 4
HIGH_GPA = 1 << 32  # where the second region of a two-region memory starts

_desc = struct.Struct("<QIHH")
#: used entries (sorted), guest RAM above the rings, the image, refused chains
Outcome = tuple[list[tuple[int, int]], bytes, bytes, int]


@dataclass(frozen=True)
class Request:
    kind: int = 0
    sector: int = 0
    data_len: int = 4096
    header_len: int = 16
    status_len: int = 1
    data_writable: bool | None = None  # None: as the type wants
    indirect: bool = True
    #: which buffer lies partly outside guest memory: "", "header", "data", "status"
    outside: str = ""
    #: an indirect table whose entries are not in order 0 -> 1 -> 2
    shuffled: bool = False
    #: the second descriptor's next points back at itself
    loop: bool = False
    #: the buffers lie in the second memory region
    high: bool = False
    #: the data in this many buffers (the last takes what does not divide)
    segments: int = 1
    #: an indirect table of this many bytes instead (None: as the buffers need)
    table_len: int | None = None


class Bench:
    """One device, one queue and its guest RAM (two regions when ``two_regions``)."""

    def __init__(self, tmp: Path, *, read_only: bool = False, writeback: bool = True,
                 two_regions: bool = False, indirect: bool = True) -> None:
        self.image = tmp / "disk.img"
        self.image.write_bytes(IMAGE)
        self.device = BlkDevice(str(self.image), read_only=read_only, writeback=writeback)
        self.device.writeback = writeback
        self.ram = GuestRam(RAM_SIZE)
        half = RAM_SIZE // 2
        if two_regions:
            buf = self.ram._map
            memory = GuestMemory([
                MemoryRegion.from_buffer(RegionSpec(0, half, 0x1000_0000, 0), buf),
                MemoryRegion.from_buffer(RegionSpec(HIGH_GPA, half, 0x2000_0000, half), buf),
            ])
        else:
            memory = self.ram.memory()
        self.driver = DriverQueue(self.ram, RING)
        self.queue = SplitQueue(0, RING)
        self.queue.set_features(event_idx=False, indirect=indirect)
        self.queue.setup(memory, self.driver.desc_gpa, self.driver.avail_gpa,
                         self.driver.used_gpa)
        self.served_common = 0
        # The rings, then buffers from an eighth up (low) and from the half up (high).
        self._low = RAM_SIZE // 8
        self.ram.alloc(self._low - self.ram._next)
        self._high = half
        self.buffers: list[tuple[int, int]] = []  # (ram offset, size) of every buffer

    def close(self) -> None:
        self.device.close()
        self.ram.close()

    def disable_common_path(self) -> None:
        self.device._serve_common = lambda queue, limit: 0  # type: ignore[method-assign]

    def count_common_path(self) -> None:
        serve = self.device._serve_common

        def counting(queue: SplitQueue, limit: int) -> int:
            n = serve(queue, limit)
            self.served_common += n
            return n
        self.device._serve_common = counting  # type: ignore[method-assign]

    def _buffer(self, size: int, fill: bytes, *, outside: bool, high: bool) -> int:
        """A buffer's guest address (its bytes start as ``fill``)."""
        if outside:
            # Straddling the end of the region (wholly past it for one byte).
            end = RAM_SIZE if not high else HIGH_GPA + RAM_SIZE // 2
            return end - size // 2
        if high:
            offset = self._high
            self._high += (max(size, 1) + 15) & ~15
        else:
            offset = self.ram.alloc(max(size, 1), 16)
        self.ram.write(offset, (fill * size)[:size])
        self.buffers.append((offset, size))
        return offset + (HIGH_GPA - RAM_SIZE // 2 if high else 0)

    def offer(self, r: Request) -> None:
        header = struct.pack("<IIQ", r.kind, 0, r.sector).ljust(r.header_len, b"\0")
        header = header[:r.header_len]
        hdr = self._buffer(r.header_len, b"\0", outside=r.outside == "header", high=r.high)
        if r.outside != "header":
            self.ram.write(self._ram_offset(hdr), header)
        writable = r.kind != 1 if r.data_writable is None else r.data_writable
        entries = [(hdr, r.header_len, 0)]
        if r.data_len:
            segments = max(1, min(r.segments, r.data_len))
            each = r.data_len // segments
            sizes = [each] * (segments - 1) + [r.data_len - each * (segments - 1)]
            for i, size in enumerate(sizes):
                outside = r.outside == "data" and i == len(sizes) - 1
                data = self._buffer(size, b"\xaa", outside=outside, high=r.high)
                entries.append((data, size, WRITE if writable else 0))
        status = self._buffer(r.status_len, b"\xff", outside=r.outside == "status", high=r.high)
        entries.append((status, r.status_len, WRITE))
        if r.indirect:
            order = list(range(len(entries)))
            if r.shuffled:
                order = order[1:] + order[:1]  # entry i of the chain sits at slot order[i]
            table = bytearray(16 * len(entries))
            for i, (gpa, length, flags) in enumerate(entries):
                last = i + 1 == len(entries)
                nxt = 0 if last else order[i + 1]
                if r.loop and i == 1:
                    nxt = order[i]
                _desc.pack_into(table, order[i] * 16, gpa, length,
                                flags | (0 if last else NEXT), nxt)
            table_gpa = self.ram.alloc(len(table) + 16, 16)
            self.ram.write(table_gpa, bytes(table))
            table_len = len(table) if r.table_len is None else r.table_len
            head = self.driver.free.pop()
            self.driver.write_desc(head, table_gpa, table_len, INDIRECT, 0)
            self.driver.in_flight[head] = [head]
        else:
            indices = [self.driver.free.pop() for _ in entries]
            for i, (gpa, length, flags) in enumerate(entries):
                last = i + 1 == len(entries)
                nxt = 0 if last else indices[i + 1]
                if r.loop and i == 1:
                    nxt = indices[i]
                self.driver.write_desc(indices[i], gpa, length, flags | (0 if last else NEXT),
                                       nxt)
            head = indices[0]
            self.driver.in_flight[head] = indices
        self.driver.make_available(head)

    def _ram_offset(self, gpa: int) -> int:
        return gpa - (HIGH_GPA - RAM_SIZE // 2) if gpa >= HIGH_GPA else gpa

    def run(self, requests: list[Request]) -> Outcome:
        """Offer ``requests`` in one batch, let the device process them; return
        (used entries, guest RAM above the rings, image, refused chains)."""
        for r in requests:
            self.offer(r)
        self.driver.publish()
        self.queue.batch_limit = 4  # several process calls per batch
        while self.queue.available():
            self.device.process(self.queue)
        self.queue.publish()
        # In any order: a refused chain is given back before the batch it was in.
        used = sorted((u.head, u.written) for u in self.driver.collect())
        return (used, self.ram.read(self._low, RAM_SIZE - self._low), self.image.read_bytes(),
                self.queue.failed_chains)


def _both(tmp: Path, requests: list[Request], **options: bool) -> tuple[Outcome, Outcome, int]:
    results: list[Outcome] = []
    served = 0
    for common in (True, False):
        folder = tmp / ("common" if common else "general")
        folder.mkdir(exist_ok=True)
        bench = Bench(folder, **options)
        try:
            if common:
                bench.count_common_path()
            else:
                bench.disable_common_path()
            results.append(bench.run(requests))
            served = served or bench.served_common
        finally:
            bench.close()
    return results[0], results[1], served


requests = st.builds(
    Request,
    kind=st.sampled_from([0, 0, 1, 1, 4, 8, 77]),
    sector=st.sampled_from([0, 7, SECTORS - 8, SECTORS - 1, SECTORS, 2**63, 2**64 - 8]),
    data_len=st.sampled_from([0, 512, 4096, 4096, 100, 8192]),
    header_len=st.sampled_from([16, 16, 16, 8, 24]),
    status_len=st.sampled_from([1, 1, 1, 2]),
    data_writable=st.sampled_from([None, None, None, True, False]),
    indirect=st.booleans(),
    outside=st.sampled_from(["", "", "", "", "header", "data", "status"]),
    shuffled=st.sampled_from([False, False, False, True]),
    loop=st.sampled_from([False, False, False, True]),
    segments=st.sampled_from([1, 1, 2, 3, 8]),
    table_len=st.sampled_from([None, None, None, None, 0, 8, 32, 40, 64, 4096 * 16]),
    high=st.booleans(),
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests, min_size=1, max_size=8), read_only=st.booleans(),
       writeback=st.booleans(), two_regions=st.booleans())
def test_common_path_does_what_the_general_path_does(
        tmp_path_factory: pytest.TempPathFactory, batch: list[Request], read_only: bool,
        writeback: bool, two_regions: bool) -> None:
    if not two_regions:
        batch = [Request(**{**r.__dict__, "high": False}) for r in batch]
    tmp = tmp_path_factory.mktemp("blk")
    common, general, _ = _both(tmp, batch, read_only=read_only, writeback=writeback,
                               two_regions=two_regions)
    assert common == general


@pytest.mark.parametrize("two_regions", [False, True])
def test_reads_and_writes_of_several_segments_take_the_common_path(
        tmp_path: Path, two_regions: bool) -> None:
    batch = [Request(kind=i % 2, sector=16 * i, data_len=8192, segments=1 + i % 4,
                     high=two_regions and i % 3 == 0) for i in range(8)]
    common, general, served = _both(tmp_path, batch, two_regions=two_regions)
    assert common == general
    used, _, image, refused = common
    assert served == 8 and refused == 0
    assert sorted(n for _, n in used) == [1] * 4 + [8193] * 4
    assert image != IMAGE


@pytest.mark.parametrize("indirect", [True, False])
@pytest.mark.parametrize("two_regions", [False, True])
def test_usual_reads_and_writes_take_the_common_path(tmp_path: Path, indirect: bool,
                                                     two_regions: bool) -> None:
    batch = [Request(kind=i % 2, sector=8 * i, indirect=indirect, high=two_regions and i % 3 == 0)
             for i in range(10)]
    common, general, served = _both(tmp_path, batch, two_regions=two_regions)
    assert common == general
    used, _, image, refused = common
    assert served == 10 and refused == 0
    assert sorted(n for _, n in used) == [1] * 5 + [4097] * 5
    assert image != IMAGE  # the writes landed (0xaa sectors)


def test_write_through_writes_take_the_general_path(tmp_path: Path) -> None:
    batch = [Request(kind=1, sector=8 * i) for i in range(6)] + [Request(kind=0)]
    common, general, served = _both(tmp_path, batch, writeback=False)
    assert common == general
    assert served == 0  # the first write stops the common path; the batch goes on generally


@pytest.mark.parametrize("request_", [
    Request(outside="data"), Request(outside="status"), Request(outside="header"),
    Request(kind=1, outside="data"), Request(sector=SECTORS - 7), Request(sector=2**64 - 8),
    Request(data_len=100), Request(shuffled=True), Request(loop=True),
    Request(segments=3, loop=True), Request(segments=3, shuffled=True),
    Request(segments=3, data_len=1000), Request(segments=4, outside="data"),
    Request(segments=2, table_len=40), Request(segments=2, table_len=32),
    Request(kind=1, segments=2, sector=SECTORS - 7), Request(segments=2, status_len=2),
    Request(kind=1, segments=2, data_writable=True), Request(segments=2, header_len=8),
    Request(loop=True, indirect=False), Request(data_writable=False),
    Request(kind=1, data_writable=True), Request(status_len=2), Request(header_len=8),
], ids=repr)
def test_hostile_request_fails_alone(tmp_path: Path, request_: Request) -> None:
    good = Request(kind=0, sector=16)
    common, general, served = _both(tmp_path, [good, request_, good])
    assert common == general
    used, _, image, _ = common
    assert image == IMAGE
    # The first good one at least took the common path; the bad one went
    # through the general path (and with it the rest of that batch).
    assert served >= 1
    written = dict(used)
    good_heads = [h for h, n in used if n == 4097]
    assert len(good_heads) == 2
    bad = [n for h, n in written.items() if h not in good_heads]
    assert bad in ([0], [1], [2])  # refused, or a status byte only


def test_status_codes_match(tmp_path: Path) -> None:
    """A sanity check of the fixture itself: the general path answers IOERR."""
    bench = Bench(tmp_path)
    try:
        bench.disable_common_path()
        bench.run([Request(sector=SECTORS)])
        offset, _ = bench.buffers[-1]
        assert bench.ram.read(offset, 1)[0] == BlkStatus.IOERR
    finally:
        bench.close()
