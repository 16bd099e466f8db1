"""virtio-rng end to end over a real unix socket, with the Python front-end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from outboard.backend import Feature, bit
from outboard.devices.rng import FileSource, RngDevice
from outboard.testing import Buffer, open_device
from outboard.transports.vhost_user import serve_path


@pytest.fixture
def source_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(10_000)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


async def _serve(nursery: trio.Nursery, device: RngDevice, path: str) -> None:
    await nursery.start(serve_path, device, path)


@pytest.mark.parametrize("features", [
    None,
    bit(Feature.VERSION_1),
    bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC),
])
async def test_rng_serves_the_source_in_order(tmp_path: Path, source_file: tuple[Path, bytes],
                                              features: int | None) -> None:
    path, data = source_file
    sock = str(tmp_path / "rng.sock")
    device = RngDevice(FileSource(str(path)))
    async with trio.open_nursery() as nursery:
        await _serve(nursery, device, sock)
        async with open_device(sock, [64], features=features) as driver:
            ram = driver.ram
            indirect = bool(driver.features >> Feature.RING_INDIRECT_DESC & 1)
            sizes = [100, 1, 4096, 333]
            bufs = [Buffer(ram.alloc(n), n, writable=True) for n in sizes]
            heads = [driver.offer(0, [b], indirect=indirect) for b in bufs]
            driver.kick(0)
            used = await driver.wait_used(0, len(bufs))
            assert [u.head for u in used] == heads
            assert [u.written for u in used] == sizes
            got = b"".join(ram.read(b.gpa, b.size) for b in bufs)
            assert got == data[:sum(sizes)]
            bases = await driver.stop()
            assert bases == [len(bufs)]
        nursery.cancel_scope.cancel()
    device.close()
    assert device.bytes_served == sum(sizes)


async def test_rng_wraps_at_end_of_file(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"abc")
    source = FileSource(str(tmp_path / "s"))
    assert source(7) == b"abcabca"
    source.close()


async def test_rng_many_batches_with_event_idx(tmp_path: Path,
                                               source_file: tuple[Path, bytes]) -> None:
    path, data = source_file
    sock = str(tmp_path / "rng.sock")
    device = RngDevice(FileSource(str(path)))
    async with trio.open_nursery() as nursery:
        await _serve(nursery, device, sock)
        async with open_device(sock, [16]) as driver:
            assert driver.event_idx
            ram = driver.ram
            buf = ram.alloc(64)
            served = b""
            # 200 rounds on a 16-entry ring: indices wrap the ring many times.
            for _ in range(200):
                driver.offer(0, [Buffer(buf, 64, writable=True)])
                driver.kick(0)
                (used,) = await driver.wait_used(0, 1)
                served += ram.read(buf, used.written)
            assert served == (data * 2)[:len(served)]
            assert len(served) == 200 * 64
        nursery.cancel_scope.cancel()
    device.close()
