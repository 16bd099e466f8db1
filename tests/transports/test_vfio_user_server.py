"""The vfio-user trio server over real sockets: reconnects, faults, commands to the
client (DMA_READ / DMA_WRITE), the INTx unmask eventfd, cancellation — and no
fd left behind after any of them."""

from __future__ import annotations

import errno
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

from outboard.backend.errors import DeviceError
from outboard.backend.fd import OwnedFd
from outboard.devices.rng import RngDevice
from outboard.testing import Buffer, GuestRam
from outboard.testing.vfio_user import (
    VfioUserClient,
    VfioUserClientError,
    VirtioPciDriver,
    open_vfio_user_device,
)
from outboard.transports.fdstream import FdStream
from outboard.transports.vfio_user import Command, VfioUserSession, serve_connection, serve_path
from outboard.transports.vfio_user.wire import (
    DeviceInfo,
    DmaMapFlags,
    IrqIndex,
    IrqSetFlags,
    RegionAccess,
    RegionIndex,
)

pytestmark = pytest.mark.usefixtures("fd_leak_check")

PAGE = 4096


@pytest.fixture
async def rng_socket(tmp_path: Path) -> AsyncIterator[str]:
    path = str(tmp_path / "rng.sock")
    device = RngDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, path)
        yield path
        nursery.cancel_scope.cancel()
    device.close()


async def read_some(driver: VirtioPciDriver, size: int = 32) -> bytes:
    buf = driver.ram.alloc(size)
    driver.offer(0, [Buffer(buf, size, writable=True)])
    await driver.kick(0)
    with trio.fail_after(10):
        (used,) = await driver.wait_used(0)
    return driver.ram.read(buf, used.written)


def header(command: int, size: int, *, msg_id: int = 1, flags: int = 0) -> bytes:
    return struct.pack("=HHIII", msg_id, command, size, flags, 0)


async def test_next_client_is_served_after_a_disconnect(rng_socket: str) -> None:
    for _ in range(3):
        async with open_vfio_user_device(rng_socket, [8]) as driver:
            assert len(await read_some(driver)) == 32


async def test_disconnect_in_the_middle_of_a_message_with_an_fd(rng_socket: str) -> None:
    async with VfioUserClient.connect(rng_socket) as client:
        await client.negotiate_version()
        ram = GuestRam(1 << 20)
        body = struct.pack("=IIQQQ", 32, 3, 0, 0, ram.size)
        await client.send(header(Command.DMA_MAP, 16 + 32) + body[:10], [ram.fd.fd])
        ram.close()
    async with open_vfio_user_device(rng_socket, [8]) as driver:
        assert len(await read_some(driver)) == 32


@pytest.mark.parametrize("message", [
    pytest.param(header(Command.DEVICE_GET_INFO, 8), id="size-below-header"),
    pytest.param(header(Command.REGION_WRITE, 1 << 30), id="absurd-size"),
    pytest.param(header(Command.VERSION, 20) + struct.pack("=HH", 9, 0), id="bad-major"),
])
async def test_fatal_fault_drops_only_that_connection(rng_socket: str, message: bytes) -> None:
    stream = await FdStream.connect(rng_socket)
    try:
        if message[2:4] != struct.pack("=H", Command.VERSION):
            await stream.send(header(Command.VERSION, 20) + struct.pack("=HH", 0, 0))
            await stream.receive_exactly(16)
            await stream.receive(4096)  # the rest of the VERSION reply
        await stream.send(message)
        with trio.fail_after(10):
            while True:  # an error reply may come first; then the server hangs up
                data, fds = await stream.receive(4096)
                assert fds == []
                if not data:
                    break
    finally:
        stream.close()
    async with open_vfio_user_device(rng_socket, [8]) as driver:
        assert len(await read_some(driver)) == 32


async def test_refused_command_leaves_the_connection_usable(rng_socket: str) -> None:
    async with VfioUserClient.connect(rng_socket) as client:
        await client.negotiate_version()
        for command, payload in [(14, b""), (Command.DMA_READ, bytes(16)),
                                 (Command.REGION_READ, bytes(RegionAccess(0, 6, 4)))]:
            reply = await client.request(command, payload, check=False)
            assert reply is not None and reply.failed
        fd = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        with pytest.raises(VfioUserClientError) as info:  # an fd where none belongs
            await client.request(Command.DEVICE_GET_INFO, bytes(DeviceInfo(16, 0, 0, 0)),
                                 [fd.fd])
        fd.close()
        assert info.value.errno == errno.EINVAL
        assert (await client.get_info()).num_regions == 9


async def test_posted_writes_are_applied_in_order(rng_socket: str) -> None:
    async with VfioUserClient.connect(rng_socket) as client:
        await client.negotiate_version()
        for value in (1, 3, 7):
            await client.region_write(RegionIndex.CONFIG, 0x3C, bytes([value]), no_reply=True)
        assert await client.region_read(RegionIndex.CONFIG, 0x3C, 1) == b"\x07"


async def test_kicks_by_region_write_without_ioeventfds(rng_socket: str) -> None:
    async with open_vfio_user_device(rng_socket, [8], ioeventfds=False) as driver:
        assert driver.notify_fds == {}
        assert len(await read_some(driver)) == 32


async def test_intx_instead_of_msix(rng_socket: str) -> None:
    async with open_vfio_user_device(rng_socket, [8], msix=False) as driver:
        for _ in range(3):
            assert len(await read_some(driver)) == 32


# -- a session on a socketpair ---------------------------------------------------------------


@pytest.fixture
async def session_pair() -> AsyncIterator[tuple[VfioUserSession, VfioUserClient]]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = RngDevice()
    async with trio.open_nursery() as nursery:
        session = await nursery.start(serve_connection, device, FdStream(a))
        async with VfioUserClient.over(FdStream(b)) as client:
            await client.negotiate_version({"max_msg_fds": 16, "max_data_xfer_size": 4096})
            yield session, client
        nursery.cancel_scope.cancel()
    device.close()


async def test_dma_to_a_window_without_an_fd_goes_through_the_client(
        session_pair: tuple[VfioUserSession, VfioUserClient]) -> None:
    session, client = session_pair
    rom = bytearray(os.urandom(4 * PAGE))
    await client.dma_map(0xC0000, 4 * PAGE, buffer=rom)
    with trio.fail_after(10):
        data = await session.dma_read(0xC0000 + 100, 3 * PAGE)
    assert data == rom[100:100 + 3 * PAGE]
    # max_data_xfer_size 4096: one command per page at most
    assert [(c, a, n) for c, a, n in client.dma_log] == [
        (Command.DMA_READ, 0xC0000 + 100, PAGE), (Command.DMA_READ, 0xC0000 + 100 + PAGE, PAGE),
        (Command.DMA_READ, 0xC0000 + 100 + 2 * PAGE, PAGE)]
    with trio.fail_after(10):
        await session.dma_write(0xC0000 + 10, b"written by the server" * 300)
    assert rom[10:10 + 21 * 300] == b"written by the server" * 300


async def test_dma_to_a_mapped_window_needs_no_message(
        session_pair: tuple[VfioUserSession, VfioUserClient]) -> None:
    session, client = session_pair
    ram = GuestRam(4 * PAGE, gpa=0x10_0000)
    try:
        await client.dma_map(ram.gpa, ram.size, fd=ram.fd)
        ram.write(ram.gpa + 8, b"zero copy")
        assert await session.dma_read(ram.gpa + 8, 9) == b"zero copy"
        await session.dma_write(ram.gpa, b"back")
        assert ram.read(ram.gpa, 4) == b"back"
        assert client.dma_log == []
        await client.dma_unmap(ram.gpa, ram.size)
    finally:
        ram.close()


async def test_dma_outside_windows_or_against_their_flags_fails(
        session_pair: tuple[VfioUserSession, VfioUserClient]) -> None:
    session, client = session_pair
    await client.dma_map(0x8000, PAGE, flags=DmaMapFlags.READ)
    with pytest.raises(DeviceError):
        await session.dma_read(0x9000, 4)
    with pytest.raises(DeviceError):
        await session.dma_write(0x8000, b"ro")
    with pytest.raises(DeviceError):
        await session.dma_read(0x8000 + PAGE - 2, 4)


async def test_dma_error_reply_from_the_client(
        session_pair: tuple[VfioUserSession, VfioUserClient]) -> None:
    session, client = session_pair
    await client.dma_map(0x8000, PAGE)
    client.windows.clear()  # the client forgot it: it answers EFAULT
    with pytest.raises(DeviceError, match="errno 14"):
        await session.dma_read(0x8000, 4)


async def test_dma_waiter_is_woken_when_the_client_goes() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = RngDevice()
    peer = FdStream(b)
    async with trio.open_nursery() as nursery:
        session: VfioUserSession = await nursery.start(serve_connection, device, FdStream(a))
        await peer.send(header(Command.VERSION, 20) + struct.pack("=HH", 0, 0))
        await peer.receive(4096)
        await peer.send(header(Command.DMA_MAP, 48, msg_id=2)
                        + struct.pack("=IIQQQ", 32, 3, 0, 0x8000, PAGE))
        await peer.receive(4096)
        failure: list[BaseException] = []
        done = trio.Event()

        async def read() -> None:
            try:
                await session.dma_read(0x8000, 4)
            except DeviceError as exc:
                failure.append(exc)
            done.set()

        nursery.start_soon(read)
        await peer.receive(4096)  # the DMA_READ; never answered
        peer.close()
        with trio.fail_after(10):
            await done.wait()
    device.close()
    assert "gone" in str(failure[0])


async def test_intx_unmask_eventfd_is_watched(
        session_pair: tuple[VfioUserSession, VfioUserClient]) -> None:
    session, client = session_pair
    trigger = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    unmask = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    try:
        await client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD
                              | IrqSetFlags.ACTION_TRIGGER, 0, 1, fds=[trigger])
        await client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD
                              | IrqSetFlags.ACTION_UNMASK, 0, 1, fds=[unmask])
        intx = session.function.intx
        intx.set_level(True)
        assert os.read(trigger.fd, 8) == (1).to_bytes(8, "little")
        assert intx.masked
        os.write(unmask.fd, (1).to_bytes(8, "little"))  # as KVM's resampler would
        with trio.fail_after(10):  # still asserted: unmasked, it fires again
            await trio.lowlevel.wait_readable(trigger.fd)
        assert intx.delivered == 2
        # A new unmask eventfd replaces the old one, which stops being watched.
        second = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        await client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD
                              | IrqSetFlags.ACTION_UNMASK, 0, 1, fds=[second])
        second.close()
        await trio.testing.wait_all_tasks_blocked()
    finally:
        trigger.close()
        unmask.close()


async def test_client_disconnect_releases_everything(tmp_path: Path) -> None:
    path = str(tmp_path / "rng.sock")
    device = RngDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, path)
        async with open_vfio_user_device(path, [8]) as driver:
            assert len(await read_some(driver)) == 32
        # the server closed its copies: the next client starts from scratch
        async with open_vfio_user_device(path, [8]) as driver:
            assert len(await read_some(driver)) == 32
        nursery.cancel_scope.cancel()
    device.close()


async def test_cancelling_the_server_with_a_client_connected(tmp_path: Path) -> None:
    path = str(tmp_path / "rng.sock")
    device = RngDevice()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_path, device, path)
            async with open_vfio_user_device(path, [8]) as driver:
                assert len(await read_some(driver)) == 32
                scope.cancel()
                await trio.sleep(0)
    device.close()
    assert not os.path.exists(path)


async def test_region_read_bigger_than_max_data_xfer_size_is_refused(rng_socket: str) -> None:
    async with VfioUserClient.connect(rng_socket) as client:
        await client.negotiate_version()
        reply = await client.request(Command.REGION_READ,
                                     bytes(RegionAccess(0, RegionIndex.CONFIG, 2 << 20)),
                                     check=False)
        assert reply is not None and reply.failed and reply.error == errno.E2BIG


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "outboard", *args],
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["rng", "blk"])
def test_cli_serves_over_vfio_user(tmp_path: Path, device: str) -> None:
    path = str(tmp_path / "cli.sock")
    extra: list[str] = []
    if device == "blk":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(1 << 20))
        extra = ["--blk-file", str(image)]
    proc = _cli(device, "--transport", "vfio-user", "--socket-path", path, *extra)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on" in line and "vfio-user" in line

        async def client() -> int:
            async with open_vfio_user_device(path, [8]) as driver:
                return await driver.read_common("num_queues")

        assert trio.run(client) == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_cli_refuses_connect_with_vfio_user(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "outboard", "rng", "--transport", "vfio-user",
                           "--connect", str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--connect is for vhost-user" in proc.stderr
