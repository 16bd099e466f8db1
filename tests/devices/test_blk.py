"""virtio-blk over a real socket with the Python front-end."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from outboard.backend import Feature, bit
from outboard.devices.blk import (
    CONFIG_SIZE,
    WRITEBACK_OFFSET,
    BlkDevice,
    BlkFeature,
    BlkStatus,
    BlkType,
)
from outboard.testing import Buffer, FrontendError, VhostUserDriver, open_device
from outboard.transports.vhost_user import serve_path

pytestmark = pytest.mark.usefixtures("fd_leak_check")

IMAGE_SIZE = 4 << 20
SECTORS = IMAGE_SIZE // 512


@dataclass
class Disk:
    driver: VhostUserDriver
    device: BlkDevice
    image: Path

    async def request(self, kind: int, sector: int = 0, *, out: bytes = b"",
                      in_size: int = 0, queue: int = 0,
                      header: bytes | None = None) -> tuple[int, bytes, int]:
        """One request; returns (status, data read, used length)."""
        ram = self.driver.ram
        head = header if header is not None else struct.pack("<IIQ", kind, 0, sector)
        hdr = ram.alloc(len(head))
        ram.write(hdr, head)
        bufs = [Buffer(hdr, len(head))]
        if out:
            gpa = ram.alloc(len(out), 512)
            ram.write(gpa, out)
            bufs.append(Buffer(gpa, len(out)))
        data = 0
        if in_size:
            data = ram.alloc(in_size, 512)
            bufs.append(Buffer(data, in_size, writable=True))
        status = ram.alloc(1)
        ram.write(status, b"\xff")
        bufs.append(Buffer(status, 1, writable=True))
        self.driver.offer(queue, bufs)
        self.driver.kick(queue)
        with trio.fail_after(10):
            (used,) = await self.driver.wait_used(queue)
        return ram.read(status, 1)[0], ram.read(data, in_size) if in_size else b"", used.written


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(3).randbytes(IMAGE_SIZE))
    return path


async def _disk(tmp_path: Path, image: Path, *, queue_processes: bool = False,
                **options: object) -> AsyncIterator[Disk]:
    sock = str(tmp_path / "blk.sock")
    device = BlkDevice(str(image), **options)  # type: ignore[arg-type]
    device.queue_processes = queue_processes
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, sock)
        async with open_device(sock, [64] * device.num_queues, ram_size=8 << 20) as driver:
            yield Disk(driver, device, image)
        nursery.cancel_scope.cancel()
    device.close()


@pytest.fixture(params=[False, True], ids=["in-process", "queue-processes"])
async def disk(tmp_path: Path, image: Path, request: pytest.FixtureRequest,
               ) -> AsyncIterator[Disk]:
    async for d in _disk(tmp_path, image, num_queues=2, queue_processes=request.param):
        yield d


async def test_features_and_config(disk: Disk) -> None:
    f = disk.driver.features
    for feature in (BlkFeature.FLUSH, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.MQ,
                    BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES, BlkFeature.CONFIG_WCE,
                    BlkFeature.TOPOLOGY, BlkFeature.SIZE_MAX):
        assert f >> feature & 1, feature
    assert f & bit(Feature.VERSION_1)
    assert not f >> BlkFeature.RO & 1
    config = await disk.driver.frontend.get_config(0, CONFIG_SIZE)
    capacity, size_max, seg_max = struct.unpack_from("<QII", config)
    assert capacity == SECTORS and seg_max == disk.device.queue_size - 2 and size_max > 0
    assert struct.unpack_from("<I", config, 20)[0] == 512
    assert struct.unpack_from("<H", config, 34)[0] == 2
    # A longer read (a newer front-end's struct) is padded with zeros.
    assert (await disk.driver.frontend.get_config(0, 96))[CONFIG_SIZE:] == bytes(24)


async def test_read_write_round_trip_on_both_queues(disk: Disk) -> None:
    data = os.urandom(8192)
    for queue in (0, 1):
        sector = 100 + queue * 16
        status, _, _ = await disk.request(BlkType.OUT, sector, out=data, queue=queue)
        assert status == BlkStatus.OK
        status, got, used = await disk.request(BlkType.IN, sector, in_size=8192, queue=queue)
        assert status == BlkStatus.OK and got == data and used == 8192 + 1
        with open(disk.image, "rb") as f:
            f.seek(sector * 512)
            assert f.read(8192) == data


async def test_read_reads_the_image(disk: Disk) -> None:
    original = disk.image.read_bytes()
    status, got, _ = await disk.request(BlkType.IN, SECTORS - 8, in_size=4096)
    assert status == BlkStatus.OK and got == original[-4096:]


@pytest.mark.parametrize(("sector", "size"), [
    (SECTORS - 7, 4096),   # straddles the end
    (SECTORS, 512),        # just past the end
    (2**64 - 1, 512),      # sector arithmetic would overflow
])
async def test_out_of_range_is_ioerr_and_writes_nothing(disk: Disk, sector: int,
                                                        size: int) -> None:
    before = disk.image.read_bytes()
    status, _, _ = await disk.request(BlkType.OUT, sector, out=b"x" * size)
    assert status == BlkStatus.IOERR
    status, _, _ = await disk.request(BlkType.IN, sector, in_size=size)
    assert status == BlkStatus.IOERR
    assert disk.image.read_bytes() == before
    assert disk.image.stat().st_size == IMAGE_SIZE


async def test_partial_sector_is_ioerr(disk: Disk) -> None:
    status, _, _ = await disk.request(BlkType.OUT, 0, out=b"x" * 100)
    assert status == BlkStatus.IOERR


async def test_unknown_type_is_unsupported(disk: Disk) -> None:
    status, _, _ = await disk.request(77, 0)
    assert status == BlkStatus.UNSUPP


async def test_short_header_is_ioerr(disk: Disk) -> None:
    status, _, _ = await disk.request(0, header=b"\0" * 8)
    assert status == BlkStatus.IOERR
    # and the queue goes on
    status, _, _ = await disk.request(BlkType.IN, 0, in_size=512)
    assert status == BlkStatus.OK


async def test_get_id(tmp_path: Path, image: Path) -> None:
    async for disk in _disk(tmp_path, image, serial="serial-123"):
        status, got, _ = await disk.request(BlkType.GET_ID, in_size=20)
        assert status == BlkStatus.OK and got == b"serial-123".ljust(20, b"\0")


async def test_flush_reaches_the_image(disk: Disk) -> None:
    status, _, _ = await disk.request(BlkType.FLUSH)
    assert status == BlkStatus.OK
    # A queue process counts for itself; its counts reach the device when it stops.
    await disk.driver.stop()
    assert disk.device.stats["flush"] == 1


async def test_discard_and_write_zeroes_read_back_zero(disk: Disk) -> None:
    for kind, flags in ((BlkType.DISCARD, 0), (BlkType.WRITE_ZEROES, 0),
                        (BlkType.WRITE_ZEROES, 1)):
        seg = struct.pack("<QII", 64, 16, flags)
        status, _, _ = await disk.request(kind, out=seg)
        assert status == BlkStatus.OK
        status, got, _ = await disk.request(BlkType.IN, 64, in_size=16 * 512)
        assert got == bytes(16 * 512)
        # the neighbours are untouched
        status, got, _ = await disk.request(BlkType.IN, 63, in_size=512)
        assert got != bytes(512)
        status, _, _ = await disk.request(BlkType.OUT, 64, out=os.urandom(16 * 512))


async def test_discard_out_of_range_is_ioerr(disk: Disk) -> None:
    seg = struct.pack("<QII", SECTORS - 1, 16, 0)
    status, _, _ = await disk.request(BlkType.DISCARD, out=seg)
    assert status == BlkStatus.IOERR
    status, _, _ = await disk.request(BlkType.DISCARD, out=b"short")
    assert status == BlkStatus.IOERR


async def test_read_only_refuses_writes(tmp_path: Path, image: Path) -> None:
    before = image.read_bytes()
    async for disk in _disk(tmp_path, image, read_only=True):
        assert disk.driver.features >> BlkFeature.RO & 1
        assert not disk.driver.features >> BlkFeature.DISCARD & 1
        status, _, _ = await disk.request(BlkType.OUT, 0, out=b"y" * 512)
        assert status == BlkStatus.IOERR
        status, _, _ = await disk.request(BlkType.WRITE_ZEROES,
                                          out=struct.pack("<QII", 0, 8, 0))
        assert status == BlkStatus.IOERR
        status, got, _ = await disk.request(BlkType.IN, 0, in_size=512)
        assert status == BlkStatus.OK and got == before[:512]
    assert image.read_bytes() == before


async def test_writeback_toggle_through_set_config(disk: Disk) -> None:
    fe = disk.driver.frontend
    assert disk.device.writeback
    await fe.set_config(WRITEBACK_OFFSET, b"\x00")
    assert (await fe.get_config(WRITEBACK_OFFSET, 1)) == b"\x00"
    assert not disk.device.writeback
    status, _, _ = await disk.request(BlkType.OUT, 8, out=b"z" * 512)
    assert status == BlkStatus.OK
    await fe.set_config(WRITEBACK_OFFSET, b"\x01")
    assert disk.device.writeback
    # Other fields are read-only: refused (REPLY_ACK is negotiated).
    with pytest.raises(FrontendError):
        await fe.set_config(0, b"\x00" * 8)
    assert (await fe.get_config(0, 8)) == struct.pack("<Q", SECTORS)


async def test_many_requests_in_one_batch(disk: Disk) -> None:
    """Fill the ring, kick once: every request completes with the right data."""
    ram = disk.driver.ram
    original = disk.image.read_bytes()
    requests = []
    for i in range(20):
        hdr = ram.alloc(16)
        ram.write(hdr, struct.pack("<IIQ", BlkType.IN, 0, i * 8))
        data = ram.alloc(4096, 512)
        status = ram.alloc(1)
        head = disk.driver.offer(0, [Buffer(hdr, 16), Buffer(data, 4096, writable=True),
                                     Buffer(status, 1, writable=True)])
        requests.append((head, data, status, i * 8))
    disk.driver.kick(0)
    with trio.fail_after(10):
        used = await disk.driver.wait_used(0, len(requests))
    assert sorted(u.head for u in used) == sorted(r[0] for r in requests)
    for _, data, status, sector in requests:
        assert ram.read(status, 1) == b"\0"
        assert ram.read(data, 4096) == original[sector * 512:sector * 512 + 4096]


def test_print_capabilities_lists_block_features() -> None:
    assert BlkDevice.capabilities() == {"type": "block", "features": ["read-only", "blk-file"]}
