"""virtio-net over vfio-user (the Python client and virtio-pci driver): the
device knows nothing of the transport, so a loopback round trip works as over
vhost-user."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from outboard.devices.net import Loopback, NetDevice
from outboard.devices.net.wire import HEADER_SIZE
from outboard.testing import Buffer
from outboard.testing.vfio_user import open_vfio_user_device
from outboard.transports.vfio_user import serve_path

from .test_net import MAC_A, MAC_B, frame, header

pytestmark = pytest.mark.usefixtures("fd_leak_check")


async def test_loopback_round_trip_over_vfio_user(tmp_path: Path) -> None:
    sock = str(tmp_path / "net.sock")
    device = NetDevice(Loopback(), mac=MAC_A)
    sent = [header() + frame(MAC_A, MAC_B, size, seed=size) for size in (60, 1514)]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, sock)
        async with open_vfio_user_device(sock, [64, 64, 16]) as driver:
            ram = driver.ram
            rx = {driver.offer(0, [Buffer(gpa, 2048, writable=True)]): gpa
                  for gpa in (ram.alloc(2048) for _ in range(4))}
            await driver.kick(0)
            for packet in sent:
                gpa = ram.alloc(len(packet))
                ram.write(gpa, packet)
                driver.offer(1, [Buffer(gpa, len(packet))])
            await driver.kick(1)
            with trio.fail_after(10):
                used = await driver.wait_used(0, 2)
                await driver.wait_used(1, 2)
            got = [ram.read(rx[u.head], u.written) for u in used]
        nursery.cancel_scope.cancel()
    device.close()
    assert [g[HEADER_SIZE:] for g in got] == [p[HEADER_SIZE:] for p in sent]
    assert all(g[10:12] == b"\x01\x00" for g in got)  # num_buffers
