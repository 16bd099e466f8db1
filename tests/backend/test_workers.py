"""Queues served by processes of their own (``VirtioDevice.queue_processes``)."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from outboard.backend import DeviceStatus, QueueSpec, SplitQueue, VirtioDevice
from outboard.devices.blk import WRITEBACK_OFFSET, BlkDevice, BlkStatus, BlkType
from outboard.testing import Buffer, GuestRam, VhostUserDriver, open_device
from outboard.transports.vhost_user import serve_path
from tests.devices.test_blk import Disk

pytestmark = pytest.mark.usefixtures("fd_leak_check")

SECTORS = 2048


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return [c for c in out if _state(c) not in ("Z", "X", None)]


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


async def request(driver: VhostUserDriver, queue: int, kind: int, sector: int,
                  data: bytes = b"", in_size: int = 0) -> tuple[int, bytes]:
    status, got, _ = await Disk(driver, None, None).request(  # type: ignore[arg-type]
        kind, sector, out=data, in_size=in_size, queue=queue)
    return status, got


@asynccontextmanager
async def served(tmp_path: Path, device: VirtioDevice, queues: Sequence[int],
                 ) -> AsyncIterator[VhostUserDriver]:
    device.queue_processes = True
    sock = str(tmp_path / "dev.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_path, device, sock)
        async with open_device(sock, queues, ram_size=4 << 20) as driver:
            yield driver
        nursery.cancel_scope.cancel()
    device.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(7).randbytes(SECTORS * 512))
    return path


async def test_each_queue_runs_in_a_process_of_its_own(tmp_path: Path, image: Path) -> None:
    async with served(tmp_path, BlkDevice(str(image), num_queues=2), [64, 64]) as driver:
        workers = children(os.getpid())
        assert len(workers) == 2
        for queue in (0, 1):
            data = os.urandom(4096)
            status, _ = await request(driver, queue, BlkType.OUT, 8 * queue, data)
            assert status == BlkStatus.OK
            status, got = await request(driver, 1 - queue, BlkType.IN, 8 * queue, in_size=4096)
            assert status == BlkStatus.OK and got == data
        # A child keeps only what its queue needs: stdio, its control socket,
        # the kick, call and err eventfds and the image.
        for pid in workers:
            assert len(os.listdir(f"/proc/{pid}/fd")) <= 8
        assert children(os.getpid()) == workers
    assert children(os.getpid()) == []  # stopped and reaped with the connection


async def test_stopping_reports_where_the_process_left_the_ring(tmp_path: Path,
                                                                image: Path) -> None:
    device = BlkDevice(str(image))
    async with served(tmp_path, device, [64]) as driver:
        for i in range(5):
            status, _ = await request(driver, 0, BlkType.IN, i, in_size=512)
            assert status == BlkStatus.OK
        assert await driver.frontend.get_vring_base(0) == 5
        assert children(os.getpid()) == []
        # What the process counted arrived with its answer.
        assert device.stats["read"] == 5


async def test_changes_start_a_new_process_that_carries_on(tmp_path: Path,
                                                           image: Path) -> None:
    async with served(tmp_path, BlkDevice(str(image)), [64]) as driver:
        status, _ = await request(driver, 0, BlkType.OUT, 0, b"a" * 512)
        assert status == BlkStatus.OK
        (before,) = children(os.getpid())
        await driver.frontend.set_config(WRITEBACK_OFFSET, b"\0")  # write through
        (after,) = children(os.getpid())
        assert after != before and _state(before) is None
        status, _ = await request(driver, 0, BlkType.OUT, 1, b"b" * 512)
        assert status == BlkStatus.OK
        status, got = await request(driver, 0, BlkType.IN, 0, in_size=1024)
        assert status == BlkStatus.OK and got == b"a" * 512 + b"b" * 512
        assert await driver.frontend.get_vring_base(0) == 3


async def test_a_region_added_while_running_reaches_the_process(tmp_path: Path,
                                                                image: Path) -> None:
    async with served(tmp_path, BlkDevice(str(image)), [64]) as driver:
        (before,) = children(os.getpid())
        more = GuestRam(1 << 20, gpa=1 << 32, uva=0x7E00_0000_0000)
        try:
            await driver.frontend.add_mem_reg(more)
            (after,) = children(os.getpid())
            assert after != before  # a new process, with the new region mapped
            # A read into the new region, header and status in the old one.
            hdr, status = driver.ram.alloc(16), driver.ram.alloc(1)
            driver.ram.write(hdr, struct.pack("<IIQ", BlkType.IN, 0, 3))
            driver.offer(0, [Buffer(hdr, 16), Buffer(more.gpa, 512, writable=True),
                             Buffer(status, 1, writable=True)])
            driver.kick(0)
            with trio.fail_after(10):
                (used,) = await driver.wait_used(0)
            assert used.written == 513 and driver.ram.read(status, 1) == b"\0"
            assert more.read(more.gpa, 512) == image.read_bytes()[3 * 512:4 * 512]
            await driver.frontend.rem_mem_reg(more)
            status_code, _ = await request(driver, 0, BlkType.IN, 0, in_size=512)
            assert status_code == BlkStatus.OK
        finally:
            more.close()


class Failing(VirtioDevice):
    device_id = 4

    @property
    def queues(self) -> Sequence[QueueSpec]:
        return (QueueSpec("a", 64), QueueSpec("b", 64))

    def process(self, queue: SplitQueue) -> None:
        if queue.index == 0 and queue.available():
            raise RuntimeError("a bug in the device")
        for chain in queue:
            queue.push(chain, 0)


async def test_a_device_failing_in_a_process_stops_that_queue_only(tmp_path: Path) -> None:
    async with served(tmp_path, Failing(), [64, 64]) as driver:
        ram = driver.ram
        for queue in (0, 1):
            driver.offer(queue, [Buffer(ram.alloc(16), 16)])
            driver.kick(queue)
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(driver.errs[0].fd)  # the process said so
            await driver.wait_used(1)  # and the other queue goes on
        await driver.frontend.get_vring_base(0)
        assert await driver.frontend.get_status() & DeviceStatus.DEVICE_NEEDS_RESET


class Echo(VirtioDevice):
    """Gives every chain back, one at a time and slowly (half a millisecond of
    work each): a driver that refills at once keeps it busy for good."""

    device_id = 4

    @property
    def queues(self) -> Sequence[QueueSpec]:
        return (QueueSpec("a", 64),)

    def process(self, queue: SplitQueue) -> None:
        chain = queue.pop()
        if chain is not None:
            until = time.perf_counter() + 0.0005
            while time.perf_counter() < until:
                pass
            queue.push(chain, 0)


def _keep_busy(driver: VhostUserDriver, seconds: float) -> None:
    """In a forked process: give every used chain straight back, so the ring is
    never empty (the way a busy DPDK sender keeps a transmit ring full)."""
    q = driver.queues[0]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for used in q.collect():
            q.make_available(used.head)
        q.publish()
        os.write(driver.kicks[0].fd, (1).to_bytes(8, "little"))


async def test_a_queue_that_never_empties_still_stops_at_once(tmp_path: Path) -> None:
    async with served(tmp_path, Echo(), [64]) as driver:
        ram = driver.ram
        for _ in range(32):
            driver.offer(0, [Buffer(ram.alloc(16), 16)])
        driver.kick(0)
        helper = os.fork()
        if helper == 0:
            try:
                _keep_busy(driver, 20)
            finally:
                os._exit(0)
        try:
            with trio.fail_after(10):
                while driver.queues[0].device_used_idx < 500:
                    await trio.sleep(0.01)  # until the process has been busy a while
                started = time.monotonic()
                await driver.frontend.get_vring_base(0)
            assert time.monotonic() - started < 5
        finally:
            os.kill(helper, signal.SIGKILL)
            os.waitpid(helper, 0)


def two_queue_cli(tmp_path: Path, image: Path, **popen: object,
                  ) -> tuple[str, subprocess.Popen[str]]:
    """``outboard blk`` with two queues in processes of their own: its socket path
    and its process."""
    sock = str(tmp_path / "blk.sock")
    proc = subprocess.Popen([sys.executable, "-m", "outboard", "blk", "--socket-path", sock,
                             "--blk-file", str(image), "--num-queues", "2",
                             "--queue-processes"], stderr=subprocess.PIPE, text=True,
                            **popen)  # type: ignore[call-overload]
    return sock, proc


async def wait_for_socket(path: str) -> None:
    with trio.fail_after(20):
        while not os.path.exists(path):
            await trio.sleep(0.05)


def test_queue_processes_die_with_the_back_end(tmp_path: Path, image: Path) -> None:
    sock, proc = two_queue_cli(tmp_path, image)

    async def run() -> None:
        await wait_for_socket(sock)
        async with open_device(sock, [64, 64], ram_size=4 << 20) as driver:
            status, _ = await request(driver, 1, BlkType.IN, 0, in_size=512)
            assert status == BlkStatus.OK
            workers = children(proc.pid)
            assert len(workers) == 2
            pidfds = [os.pidfd_open(pid) for pid in workers]
            try:
                proc.send_signal(signal.SIGKILL)
                with trio.fail_after(10):
                    for pidfd in pidfds:
                        await trio.lowlevel.wait_readable(pidfd)  # that process ended
            finally:
                for pidfd in pidfds:
                    os.close(pidfd)

    try:
        trio.run(run)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_ctrl_c_to_the_process_group_stops_everything_in_order(tmp_path: Path,
                                                               image: Path) -> None:
    sock, proc = two_queue_cli(tmp_path, image, start_new_session=True)

    async def run() -> None:
        await wait_for_socket(sock)
        async with open_device(sock, [64, 64], ram_size=4 << 20) as driver:
            status, _ = await request(driver, 0, BlkType.IN, 0, in_size=512)
            assert status == BlkStatus.OK
            assert len(children(proc.pid)) == 2
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
            _, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=20))
            assert proc.returncode == 0, err
            assert "did not answer" not in err and "Traceback" not in err

    try:
        trio.run(run)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_queue_processes_are_for_vhost_user(tmp_path: Path, image: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "outboard", "blk", "--transport", "vfio-user",
                             "--socket-path", str(tmp_path / "s"), "--blk-file", str(image),
                             "--queue-processes"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "--queue-processes is for vhost-user" in result.stderr
