"""virtio-rng over vfio-user, end to end with the Python client and virtio-pci driver."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from outboard.backend import Feature, bit
from outboard.devices.rng import FileSource, RngDevice
from outboard.testing import Buffer
from outboard.testing.vfio_user import open_vfio_user_device
from outboard.transports.vfio_user import serve_path

pytestmark = pytest.mark.usefixtures("fd_leak_check")


@pytest.fixture
def source_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(10_000)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("interrupts", ["msix", "intx"])
@pytest.mark.parametrize("kicks", ["ioeventfd", "region-write"])
@pytest.mark.parametrize("features", [
    None,
    bit(Feature.VERSION_1),
    bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC),
])
async def test_rng_serves_the_source_in_order(tmp_path: Path, source_file: tuple[Path, bytes],
                                              features: int | None, kicks: str,
                                              interrupts: str) -> None:
    path, data = source_file
    sock = str(tmp_path / "rng.sock")
    device = RngDevice(FileSource(str(path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, sock)
        async with open_vfio_user_device(sock, [64], features=features,
                                         ioeventfds=kicks == "ioeventfd",
                                         msix=interrupts == "msix") as driver:
            ram = driver.ram
            indirect = bool(driver.features >> Feature.RING_INDIRECT_DESC & 1)
            sizes = [100, 1, 4096, 333]
            bufs = [Buffer(ram.alloc(n), n, writable=True) for n in sizes]
            heads = [driver.offer(0, [b], indirect=indirect) for b in bufs]
            await driver.kick(0)
            with trio.fail_after(10):
                used = await driver.wait_used(0, len(bufs))
            assert [u.head for u in used] == heads
            assert [u.written for u in used] == sizes
            got = b"".join(ram.read(b.gpa, b.size) for b in bufs)
            assert got == data[:sum(sizes)]
        nursery.cancel_scope.cancel()
    device.close()
    assert device.bytes_served == sum(sizes)


async def test_rng_many_batches_with_event_idx(tmp_path: Path,
                                               source_file: tuple[Path, bytes]) -> None:
    path, data = source_file
    sock = str(tmp_path / "rng.sock")
    device = RngDevice(FileSource(str(path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, sock)
        async with open_vfio_user_device(sock, [16]) as driver:
            assert driver.event_idx
            ram = driver.ram
            buf = ram.alloc(64)
            served = b""
            # 200 rounds on a 16-entry ring: indices wrap the ring many times.
            for _ in range(200):
                driver.offer(0, [Buffer(buf, 64, writable=True)])
                await driver.kick(0)
                with trio.fail_after(10):
                    (used,) = await driver.wait_used(0, 1)
                served += ram.read(buf, used.written)
            assert served == (data * 2)[:len(served)]
            assert len(served) == 200 * 64
        nursery.cancel_scope.cancel()
    device.close()


async def test_masked_vector_holds_the_completion_until_unmasked(tmp_path: Path) -> None:
    sock = str(tmp_path / "rng.sock")
    device = RngDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, sock)
        async with open_vfio_user_device(sock, [8], features=bit(Feature.VERSION_1)) as driver:
            vector = driver.vector_of(0)
            await driver.mask_vector(vector, True)
            buf = driver.ram.alloc(8)
            driver.offer(0, [Buffer(buf, 8, writable=True)])
            await driver.kick(0)
            with trio.fail_after(10):
                while not driver.queues[0].pending_used():
                    await trio.lowlevel.checkpoint()
            assert await driver.read_pba() == 1 << vector  # pending, no eventfd write
            await driver.mask_vector(vector, False)  # fires once, clears the bit
            with trio.fail_after(10):
                (used,) = await driver.wait_used(0)
            assert used.written == 8
            assert await driver.read_pba() == 0
        nursery.cancel_scope.cancel()
    device.close()
