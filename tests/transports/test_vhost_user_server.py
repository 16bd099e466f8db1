"""The trio server with a real socket: reconnects, faults, call-fd swaps, modes."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from outboard.backend.fd import OwnedFd
from outboard.devices.rng import RngDevice
from outboard.testing import Buffer, GuestRam, VhostUserDriver, VhostUserFrontend, open_device
from outboard.transports.fdstream import FdStream
from outboard.transports.vhost_user import FrontendReq, serve_connect, serve_listener, serve_path

pytestmark = pytest.mark.usefixtures("fd_leak_check")


@pytest.fixture
async def rng_socket(tmp_path: Path) -> AsyncIterator[str]:
    path = str(tmp_path / "rng.sock")
    device = RngDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, path)
        yield path
        nursery.cancel_scope.cancel()
    device.close()


async def read_some(driver: VhostUserDriver, size: int = 32) -> bytes:
    buf = driver.ram.alloc(size)
    driver.offer(0, [Buffer(buf, size, writable=True)])
    driver.kick(0)
    with trio.fail_after(10):
        (used,) = await driver.wait_used(0)
    return driver.ram.read(buf, used.written)


async def test_next_connection_is_served_after_a_disconnect(rng_socket: str) -> None:
    for _ in range(3):
        async with open_device(rng_socket, [8]) as driver:
            assert len(await read_some(driver)) == 32


async def test_disconnect_in_the_middle_of_a_message(rng_socket: str) -> None:
    fe = await VhostUserFrontend.connect(rng_socket)
    ram = GuestRam(1 << 20)
    # A SET_MEM_TABLE header and half its body, with the memfd; then hang up.
    body = struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, ram.size, ram.uva, 0)
    await fe.stream.send(struct.pack("=III", FrontendReq.SET_MEM_TABLE, 1, len(body))
                         + body[:10], [ram.fd.fd])
    await fe.aclose()
    ram.close()
    async with open_device(rng_socket, [8]) as driver:
        assert len(await read_some(driver)) == 32


@pytest.mark.parametrize("message", [
    struct.pack("=III", 999, 1, 0),                                  # unknown request
    struct.pack("=III", FrontendReq.GET_FEATURES, 2, 0),             # bad version
    struct.pack("=III", FrontendReq.SET_FEATURES, 1, 4) + bytes(4),  # short payload
    struct.pack("=III", FrontendReq.SET_FEATURES, 1, 1 << 30),       # absurd size
    struct.pack("=III", FrontendReq.SET_VRING_ADDR, 1, 40) + bytes(40),  # no memory: no answer
])
async def test_protocol_violation_drops_only_that_connection(
        rng_socket: str, message: bytes) -> None:
    fe = await VhostUserFrontend.connect(rng_socket)
    await fe.stream.send(message)
    with trio.fail_after(10):
        data, fds = await fe.stream.receive(100)
    assert data == b"" and fds == []  # the back-end hung up
    await fe.aclose()
    async with open_device(rng_socket, [8]) as driver:
        assert len(await read_some(driver)) == 32


async def test_refused_request_with_reply_ack_keeps_the_connection(rng_socket: str) -> None:
    async with open_device(rng_socket, [8]) as driver:
        fe = driver.frontend
        assert fe.need_reply_default
        # SET_VRING_NUM on a running queue is refused with a nack, nothing more.
        await fe.send(FrontendReq.SET_VRING_NUM, struct.pack("=II", 0, 3), flags=1 | 8)
        with trio.fail_after(10):
            body = await fe.receive_reply(FrontendReq.SET_VRING_NUM)
        assert struct.unpack("=Q", body)[0] != 0
        assert len(await read_some(driver)) == 32


async def test_no_lost_interrupt_across_call_swap(rng_socket: str) -> None:
    async with open_device(rng_socket, [8]) as driver:
        q = driver.queues[0]
        for _ in range(20):
            if q.event_idx:
                q.set_used_event(q.last_used_idx)
            buf = driver.ram.alloc(16)
            driver.offer(0, [Buffer(buf, 16, writable=True)])
            driver.kick(0)
            # Swap the call fd while the completion may be in flight; then wait
            # on the new fd only. The interrupt must not be lost.
            new = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            await driver.frontend.set_vring_call(0, new)
            driver.calls[0].close()
            driver.calls[0] = new
            # Wait for the interrupt itself (not a peek at the ring): whether the
            # completion happened before or after the swap, the new fd fires.
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(new.fd)
            used = q.collect()
            assert len(used) == 1 and q.pending_used() == 0
            os.read(new.fd, 8)


async def test_get_vring_base_stops_the_queue(rng_socket: str) -> None:
    async with open_device(rng_socket, [8]) as driver:
        assert len(await read_some(driver)) == 32
        assert await driver.stop() == [1]
        buf = driver.ram.alloc(8)
        driver.offer(0, [Buffer(buf, 8, writable=True)])
        os.write(driver.kicks[0].fd, (1).to_bytes(8, "little"))
        await trio.testing.wait_all_tasks_blocked()
        assert driver.queues[0].pending_used() == 0


async def test_polling_queue_without_kick_fd(rng_socket: str) -> None:
    ram = GuestRam(1 << 20)
    async with await VhostUserFrontend.connect(rng_socket) as fe:
        driver = VhostUserDriver(fe, ram)
        await driver.negotiate()
        await driver.start([8])
        await fe.set_vring_kick(0, None)  # the front-end asks for polling
        buf = ram.alloc(8)
        driver.offer(0, [Buffer(buf, 8, writable=True)])
        driver.queues[0].publish()
        with trio.fail_after(10):
            (used,) = await driver.wait_used(0)
        assert used.written == 8
        driver.close()
    ram.close()


async def test_connect_mode_reaches_a_listening_front_end(tmp_path: Path) -> None:
    path = str(tmp_path / "vmm.sock")
    device = RngDevice()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        # The back-end starts first and retries until the front-end listens.
        await nursery.start(serve_connect, device, path)
        await listener.bind(path)
        listener.listen(1)
        sock, _ = await listener.accept()
        fe = VhostUserFrontend(FdStream(sock))
        ram = GuestRam(1 << 20)
        driver = VhostUserDriver(fe, ram)
        await driver.negotiate()
        await driver.start([8])
        assert len(await read_some(driver)) == 32
        driver.close()
        await fe.aclose()
        ram.close()
        nursery.cancel_scope.cancel()
    listener.close()
    device.close()


async def test_inherited_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "fd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    device = RngDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listener, device, trio.socket.from_stdlib_socket(listener))
        async with open_device(path, [8]) as driver:
            assert len(await read_some(driver)) == 32
        nursery.cancel_scope.cancel()
    listener.close()
    device.close()


def test_cli_serves_an_inherited_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "cli.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    proc = subprocess.Popen([sys.executable, "-m", "outboard", "rng", "--fd",
                             str(listener.fileno())], pass_fds=[listener.fileno()],
                            stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving on inherited fd" in line

        async def client() -> bytes:
            async with open_device(path, [8]) as driver:
                return await read_some(driver)

        assert len(trio.run(client)) == 32
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_print_capabilities() -> None:
    out = subprocess.run([sys.executable, "-m", "outboard", "rng", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    import json
    assert json.loads(out) == {"type": "rng"}


async def test_set_status_zero_keeps_the_ring_positions(rng_socket: str) -> None:
    """QEMU 7.2 stops a device with SET_STATUS 0 and only then asks GET_VRING_BASE."""
    async with open_device(rng_socket, [8]) as driver:
        for _ in range(3):
            assert len(await read_some(driver)) == 32
        await driver.frontend.set_status(0)
        assert await driver.stop() == [3]


async def test_ring_enabled_before_set_features_stays_enabled(rng_socket: str) -> None:
    """QEMU enables a net device's rings before SET_FEATURES and never again."""
    ram = GuestRam(1 << 20)
    async with await VhostUserFrontend.connect(rng_socket) as fe:
        driver = VhostUserDriver(fe, ram)
        offered = await fe.get_features()
        await fe.set_protocol_features(await fe.get_protocol_features())
        await fe.set_owner()
        await fe.set_vring_enable(0, True)
        await fe.set_features(offered)
        driver.features = offered
        fe.protocol_features = 0  # start() must not enable the ring again
        await driver.start([8])
        assert len(await read_some(driver)) == 32
        driver.close()
    ram.close()


async def test_the_same_region_added_twice_is_counted(rng_socket: str) -> None:
    """QEMU sends ADD_MEM_REG once per vhost device, so once per queue pair."""
    ram = GuestRam(1 << 20)
    async with await VhostUserFrontend.connect(rng_socket) as fe:
        driver = VhostUserDriver(fe, ram)
        await driver.negotiate()
        await fe.add_mem_reg(ram)
        await fe.add_mem_reg(ram)
        await fe.rem_mem_reg(ram)  # one reference left: still mapped
        await driver.start([8], share_memory=False)
        assert len(await read_some(driver)) == 32
        driver.close()
    ram.close()
