"""virtio-blk over vfio-user, end to end with the Python client and virtio-pci driver:
the same device class as over vhost-user, reached through a PCI function."""

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
from outboard.testing import Buffer
from outboard.testing.vfio_user import VirtioPciDriver, open_vfio_user_device
from outboard.transports.vfio_user import serve_path

pytestmark = pytest.mark.usefixtures("fd_leak_check")

IMAGE_SIZE = 4 << 20
SECTORS = IMAGE_SIZE // 512


@dataclass
class Disk:
    driver: VirtioPciDriver
    device: BlkDevice
    image: Path

    async def request(self, kind: int, sector: int = 0, *, out: bytes = b"",
                      in_size: int = 0, queue: int = 0) -> tuple[int, bytes, int]:
        """One request; returns (status, data read, used length)."""
        ram = self.driver.ram
        hdr = ram.alloc(16)
        ram.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        bufs = [Buffer(hdr, 16)]
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
        await self.driver.kick(queue)
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
        async with open_vfio_user_device(sock, [64] * device.num_queues,
                                         ram_size=8 << 20) as driver:
            yield Disk(driver, device, image)
        nursery.cancel_scope.cancel()
    device.close()


@pytest.fixture
async def disk(tmp_path: Path, image: Path) -> AsyncIterator[Disk]:
    async for d in _disk(tmp_path, image, num_queues=2):
        yield d


async def test_features_and_device_config(disk: Disk) -> None:
    driver = disk.driver
    for bit_number in (Feature.VERSION_1, BlkFeature.FLUSH, BlkFeature.MQ,
                       BlkFeature.CONFIG_WCE):
        assert driver.features >> bit_number & 1
    config = await driver.read_device_config(0, CONFIG_SIZE)
    assert struct.unpack_from("<Q", config)[0] == SECTORS
    assert struct.unpack_from("<H", config, 34)[0] == 2  # num_queues
    assert await driver.read_common("num_queues") == 2


async def test_read_write_round_trip_on_both_queues(disk: Disk) -> None:
    for queue in (0, 1):
        payload = os.urandom(8192)
        status, _, _ = await disk.request(BlkType.OUT, 100 + queue * 16, out=payload,
                                          queue=queue)
        assert status == BlkStatus.OK
        status, data, written = await disk.request(BlkType.IN, 100 + queue * 16,
                                                   in_size=8192, queue=queue)
        assert (status, data, written) == (BlkStatus.OK, payload, 8193)
    with open(disk.image, "rb") as f:
        f.seek(100 * 512)
        assert len(f.read(8192)) == 8192


async def test_queue_processes_are_declined_with_a_warning(
        tmp_path: Path, image: Path, caplog: pytest.LogCaptureFixture) -> None:
    async for disk in _disk(tmp_path, image, num_queues=2, queue_processes=True):
        status, data, _ = await disk.request(BlkType.IN, 0, in_size=512, queue=1)
        assert status == BlkStatus.OK and data == image.read_bytes()[:512]
        assert "queue processes are for vhost-user" in caplog.text
        assert not disk.device.queue_processes


async def test_read_reads_the_image(disk: Disk) -> None:
    expected = disk.image.read_bytes()[512 * 7:512 * 7 + 4096]
    status, data, _ = await disk.request(BlkType.IN, 7, in_size=4096)
    assert status == BlkStatus.OK and data == expected


async def test_out_of_range_is_ioerr(disk: Disk) -> None:
    status, _, _ = await disk.request(BlkType.IN, SECTORS, in_size=512)
    assert status == BlkStatus.IOERR


async def test_flush_and_get_id(tmp_path: Path, image: Path) -> None:
    async for d in _disk(tmp_path, image, serial="vfio-user-disk"):
        status, _, _ = await d.request(BlkType.FLUSH)
        assert status == BlkStatus.OK
        status, data, _ = await d.request(BlkType.GET_ID, in_size=20)
        assert status == BlkStatus.OK and data.rstrip(b"\0") == b"vfio-user-disk"


async def test_read_only_refuses_writes(tmp_path: Path, image: Path) -> None:
    async for d in _disk(tmp_path, image, read_only=True):
        assert d.driver.features >> BlkFeature.RO & 1
        status, _, _ = await d.request(BlkType.OUT, 0, out=bytes(512))
        assert status == BlkStatus.IOERR


async def test_writeback_toggle_through_device_config(disk: Disk) -> None:
    assert disk.device.writeback
    await disk.driver.write_device_config(WRITEBACK_OFFSET, b"\0")
    assert not disk.device.writeback
    config = await disk.driver.read_device_config(WRITEBACK_OFFSET, 1)
    assert config == b"\0"


async def test_many_requests_in_one_batch(disk: Disk) -> None:
    ram = disk.driver.ram
    statuses = []
    for i in range(20):
        hdr = ram.alloc(16)
        ram.write(hdr, struct.pack("<IIQ", BlkType.IN, 0, i))
        data = ram.alloc(512, 512)
        status = ram.alloc(1)
        statuses.append(status)
        disk.driver.offer(0, [Buffer(hdr, 16), Buffer(data, 512, writable=True),
                              Buffer(status, 1, writable=True)])
    await disk.driver.kick(0)
    with trio.fail_after(10):
        used = await disk.driver.wait_used(0, 20)
    assert len(used) == 20
    assert all(ram.read(s, 1) == b"\0" for s in statuses)


async def test_config_change_reaches_the_config_vector(disk: Disk) -> None:
    vector = disk.driver.vectors[0]  # the driver put config changes on vector 0
    before = await disk.driver.read_common("config_generation")
    disk.device.config_changed()
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(vector.fd)
    assert await disk.driver.read_common("config_generation") == before + 1


async def test_status_reset_and_renegotiation(disk: Disk) -> None:
    driver = disk.driver
    await driver.set_status(0)
    assert await driver.read_common("device_status") == 0
    driver.queues.clear()
    driver.ram.reset_allocator()
    await driver.negotiate(bit(Feature.VERSION_1) | bit(BlkFeature.FLUSH))
    await driver.start([32, 32])
    status, _, _ = await disk.request(BlkType.IN, 1, in_size=512, queue=1)
    assert status == BlkStatus.OK
