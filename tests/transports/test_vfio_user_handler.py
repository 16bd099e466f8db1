"""The vfio-user request handler over a virtio-pci function, without a socket:
each command is fed to the core as bytes, dispatched, and its reply parsed."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from outboard.backend import DeviceState, VirtioDevice
from outboard.backend.fd import OwnedFd
from outboard.backend.pci.config import ConfigSpace
from outboard.backend.pci.function import Bar, PciFunction
from outboard.backend.pci.virtio_pci import (
    COMMON_OFFSET,
    DEVICE_OFFSET,
    NOTIFY_OFFSET,
    VirtioPciFunction,
)
from outboard.backend.runtime import Runtime
from outboard.devices.blk import BlkDevice
from outboard.devices.rng import RngDevice
from outboard.transports.vfio_user.connection import Request, ServerConnection
from outboard.transports.vfio_user.dma import DmaTable
from outboard.transports.vfio_user.handler import VfioUserHandler
from outboard.transports.vfio_user.wire import (
    HEADER_SIZE,
    CapHeader,
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    IoFdType,
    IrqIndex,
    IrqInfo,
    IrqInfoFlags,
    IrqSet,
    IrqSetFlags,
    RegionAccess,
    RegionCap,
    RegionIndex,
    RegionInfo,
    RegionInfoFlags,
    RegionIoFds,
    SingleWrite,
    SparseMmapArea,
    SparseMmapHeader,
    SubRegionIoFd,
    VersionHeader,
    WriteMultiHeader,
)

pytestmark = pytest.mark.usefixtures("fd_leak_check")

PAGE = 4096
RW = DmaMapFlags.READ | DmaMapFlags.WRITE
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER


class Refused(Exception):
    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))


def memfd(size: int = 4 * PAGE) -> OwnedFd:
    fd = OwnedFd(os.memfd_create("outboard-test", os.MFD_CLOEXEC))
    os.ftruncate(fd.fd, size)
    return fd


@dataclass
class Harness:
    """The core, the handler and the function of one connection, fed bytes."""

    function: PciFunction
    conn: ServerConnection = field(default_factory=ServerConnection)
    dma: DmaTable = field(default_factory=DmaTable)
    next_id: int = 0
    memory_changes: int = 0

    def __post_init__(self) -> None:
        def changed() -> None:
            self.memory_changes += 1
            if isinstance(self.function, VirtioPciFunction):
                self.function.memory_changed()
        self.handler = VfioUserHandler(self.conn, self.function, self.dma,
                                       memory_changed=changed)

    def version(self, caps: dict[str, object] | None = None) -> bytes:
        caps = {"max_msg_fds": 16} if caps is None else caps
        body = json.dumps({"capabilities": caps}).encode() + b"\0"
        return self.command(Command.VERSION, bytes(VersionHeader(0, 0)) + body)[0]

    def command(self, command: Command, payload: bytes = b"", fds: list[OwnedFd] | None = None,
                *, no_reply: bool = False) -> tuple[bytes, list[int]]:
        self.next_id += 1
        flags = 0x10 if no_reply else 0
        self.conn.receive(struct.pack("=HHIII", self.next_id, command,
                                      HEADER_SIZE + len(payload), flags, 0) + payload, fds or [])
        req = self.conn.next_event()
        assert isinstance(req, Request)
        answer = self.handler.dispatch(req)
        if no_reply:
            assert answer is None
            return b"", []
        assert answer is not None
        reply, reply_fds = answer
        msg_id, code, size, rflags, error = struct.unpack_from("=HHIII", reply)
        assert (msg_id, code, size) == (self.next_id, command, len(reply))
        if rflags & 0x20:
            assert size == HEADER_SIZE
            raise Refused(error)
        return reply[HEADER_SIZE:], list(reply_fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        payload, _ = self.command(Command.REGION_READ, bytes(RegionAccess(offset, region, count)))
        assert RegionAccess.from_buffer_copy(payload).count == count
        return payload[16:]

    def region_write(self, region: int, offset: int, data: bytes, **kw: bool) -> None:
        self.command(Command.REGION_WRITE, bytes(RegionAccess(offset, region, len(data))) + data,
                     **kw)

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes = b"",
                 fds: list[OwnedFd] | None = None) -> None:
        self.command(Command.DEVICE_SET_IRQS,
                     bytes(IrqSet(20 + len(data), flags, index, start, count)) + data, fds)

    def close(self) -> None:
        self.handler.close()
        self.function.close()
        self.dma.clear()
        self.conn.close()


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []
    devices: list[VirtioDevice] = []
    async with trio.open_nursery() as nursery:
        def build(device: VirtioDevice | None = None, *, version: bool = True,
                  caps: dict[str, object] | None = None) -> Harness:
            device = device if device is not None else RngDevice()
            devices.append(device)
            state = DeviceState(device)
            dma = DmaTable()
            function = VirtioPciFunction(state, Runtime(state, nursery), dma.memory)
            harness = Harness(function, dma=dma)
            made.append(harness)
            if version:
                harness.version(caps)
            return harness
        yield build
        for harness in made:
            harness.close()
        for device in devices:
            device.close()
        nursery.cancel_scope.cancel()


@pytest.fixture
def blk(tmp_path: Path) -> Callable[..., BlkDevice]:
    def build(**kw: object) -> BlkDevice:
        path = tmp_path / "disk.img"
        path.write_bytes(bytes(1 << 20))
        return BlkDevice(str(path), **kw)  # type: ignore[arg-type]
    return build


# -- device and region information -------------------------------------------------------


async def test_get_info(make: Callable[..., Harness]) -> None:
    h = make()
    payload, fds = h.command(Command.DEVICE_GET_INFO, bytes(DeviceInfo(16, 0, 0, 0)))
    info = DeviceInfo.from_buffer_copy(payload)
    assert (info.argsz, info.flags, info.num_regions, info.num_irqs) == (
        16, DeviceFlags.RESET | DeviceFlags.PCI, 9, 3)
    assert fds == []


@pytest.mark.parametrize(("index", "size"), [
    (RegionIndex.BAR0, 0), (RegionIndex.BAR1, 0x2000), (RegionIndex.BAR4, 0x4000),
    (RegionIndex.BAR5, 0), (RegionIndex.ROM, 0), (RegionIndex.CONFIG, 4096),
    (RegionIndex.VGA, 0),
])
async def test_get_region_info(make: Callable[..., Harness], index: int, size: int) -> None:
    h = make()
    payload, fds = h.command(Command.DEVICE_GET_REGION_INFO,
                             bytes(RegionInfo(32, 0, index, 0, 0, 0)))
    info = RegionInfo.from_buffer_copy(payload)
    assert (info.argsz, info.index, info.size, info.cap_offset) == (32, index, size, 0)
    assert info.flags == (RegionInfoFlags.READ | RegionInfoFlags.WRITE if size else 0)
    assert fds == [] and len(payload) == 32


async def test_get_region_info_of_a_missing_region(make: Callable[..., Harness]) -> None:
    with pytest.raises(Refused) as info:
        make().command(Command.DEVICE_GET_REGION_INFO, bytes(RegionInfo(32, 0, 9, 0, 0, 0)))
    assert info.value.errno == errno.EINVAL


def mappable_function() -> tuple[PciFunction, mmap.mmap]:
    """A bare function whose BAR 2 has one mappable page (served from a memfd)."""
    config = ConfigSpace()
    config.type0_header(vendor_id=0x1AF4, device_id=0x10FF, revision=1, class_code=0xFF0000,
                        subsystem_vendor_id=0x1AF4, subsystem_id=0x40)
    fd = memfd(2 * PAGE)
    shared = mmap.mmap(fd.fd, 2 * PAGE)
    bar = Bar(2, 2 * PAGE, mmap_areas=[(PAGE, PAGE)], mmap_fd=fd)
    bar.add("page", PAGE, PAGE, lambda o, s: shared[PAGE + o:PAGE + o + s], lambda o, d: None)
    function = PciFunction(config, [bar])
    config.seal()
    return function, shared


def test_get_region_info_with_a_sparse_mmap_capability() -> None:
    function, shared = mappable_function()
    h = Harness(function)
    h.version()
    try:
        payload, fds = h.command(Command.DEVICE_GET_REGION_INFO,
                                 bytes(RegionInfo(256, 0, 2, 0, 0, 0)))
        info = RegionInfo.from_buffer_copy(payload)
        assert info.flags == (RegionInfoFlags.READ | RegionInfoFlags.WRITE
                              | RegionInfoFlags.MMAP | RegionInfoFlags.CAPS)
        assert info.argsz == len(payload) == 32 + 8 + 8 + 16
        assert info.cap_offset == 32
        cap = CapHeader.from_buffer_copy(payload, 32)
        assert (cap.id, cap.version, cap.next) == (RegionCap.SPARSE_MMAP, 1, 0)
        assert SparseMmapHeader.from_buffer_copy(payload, 40).nr_areas == 1
        area = SparseMmapArea.from_buffer_copy(payload, 48)
        assert (area.offset, area.size) == (PAGE, PAGE)
        assert fds == [function.bars[2].mmap_fd.fd]  # type: ignore[union-attr]
        # What the client maps is what the function serves.
        shared[PAGE:PAGE + 4] = b"abcd"
        assert h.region_read(2, PAGE, 4) == b"abcd"
        # "the full payload is not included in the reply, but the argsz field in
        # the reply indicates the needed size"
        payload, _ = h.command(Command.DEVICE_GET_REGION_INFO,
                               bytes(RegionInfo(32, 0, 2, 0, 0, 0)))
        short = RegionInfo.from_buffer_copy(payload)
        assert len(payload) == 32 and short.argsz == info.argsz
        assert short.cap_offset == 32  # QEMU checks it even in a short reply
    finally:
        h.close()
        shared.close()


async def test_get_region_io_fds(make: Callable[..., Harness],
                                 blk: Callable[..., BlkDevice]) -> None:
    h = make(blk(num_queues=3))
    payload, fds = h.command(Command.DEVICE_GET_REGION_IO_FDS,
                             bytes(RegionIoFds(4096, 0, RegionIndex.BAR4, 0)))
    head = RegionIoFds.from_buffer_copy(payload)
    assert (head.argsz, head.flags, head.index, head.count) == (16 + 3 * 40, 0, 4, 3)
    subs = [SubRegionIoFd.from_buffer_copy(payload, 16 + 40 * i) for i in range(3)]
    assert [(s.offset, s.size, s.fd_index, s.type, s.flags) for s in subs] == [
        (NOTIFY_OFFSET + 4 * i, 2, i, IoFdType.IOEVENTFD, 0) for i in range(3)]
    function = h.function
    assert isinstance(function, VirtioPciFunction)
    assert fds == [io.fd.fd for io in function.ioeventfds(RegionIndex.BAR4)]


async def test_get_region_io_fds_with_a_short_argsz(make: Callable[..., Harness]) -> None:
    h = make()
    payload, fds = h.command(Command.DEVICE_GET_REGION_IO_FDS,
                             bytes(RegionIoFds(16, 0, RegionIndex.BAR4, 0)))
    head = RegionIoFds.from_buffer_copy(payload)
    assert (head.argsz, head.count, len(payload), fds) == (56, 1, 16, [])


async def test_get_region_io_fds_no_more_than_the_client_takes(
        make: Callable[..., Harness], blk: Callable[..., BlkDevice]) -> None:
    h = make(blk(num_queues=4), caps={"max_msg_fds": 2})
    payload, fds = h.command(Command.DEVICE_GET_REGION_IO_FDS,
                             bytes(RegionIoFds(4096, 0, RegionIndex.BAR4, 0)))
    assert RegionIoFds.from_buffer_copy(payload).count == 2 and len(fds) == 2


@pytest.mark.parametrize("index", [RegionIndex.BAR1, RegionIndex.CONFIG, 9])
async def test_get_region_io_fds_of_a_region_without_any(make: Callable[..., Harness],
                                                         index: int) -> None:
    with pytest.raises(Refused) as info:
        make().command(Command.DEVICE_GET_REGION_IO_FDS, bytes(RegionIoFds(4096, 0, index, 0)))
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(("index", "flags", "count"), [
    (IrqIndex.INTX, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED, 1),
    (IrqIndex.MSI, IrqInfoFlags.EVENTFD, 0),
    (IrqIndex.MSIX, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE, 2),
])
async def test_get_irq_info(make: Callable[..., Harness], index: int, flags: int,
                            count: int) -> None:
    payload, _ = make().command(Command.DEVICE_GET_IRQ_INFO, bytes(IrqInfo(16, 0, index, 0)))
    info = IrqInfo.from_buffer_copy(payload)
    assert (info.argsz, info.flags, info.index, info.count) == (16, flags, index, count)


@pytest.mark.parametrize("index", [IrqIndex.ERR, IrqIndex.REQ, 7])
async def test_get_irq_info_of_a_type_we_do_not_have(make: Callable[..., Harness],
                                                     index: int) -> None:
    with pytest.raises(Refused) as info:
        make().command(Command.DEVICE_GET_IRQ_INFO, bytes(IrqInfo(16, 0, index, 0)))
    assert info.value.errno == errno.EINVAL


# -- SET_IRQS ------------------------------------------------------------------------------


async def test_msix_eventfds_assigned_and_deassigned(make: Callable[..., Harness]) -> None:
    h = make()
    msix = h.function.msix
    assert msix is not None
    fds = [eventfd(), eventfd()]
    h.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 2, fds=fds)
    assert [msix.eventfd(v) for v in (0, 1)] == fds
    assert not msix.table_masked(1)
    h.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 1, 1)  # no fds: de-assign
    assert msix.eventfd(1) is None and fds[1].closed
    assert msix.table_masked(1)
    h.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)
    assert fds[0].closed  # count 0: the whole type disabled


async def test_set_irqs_out_of_range_closes_the_fds(make: Callable[..., Harness]) -> None:
    h = make()
    fds = [eventfd(), eventfd()]
    with pytest.raises(Refused) as info:
        h.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 1, 2, fds=fds)
    assert info.value.errno == errno.EINVAL
    assert all(fd.closed for fd in fds)
    with pytest.raises(Refused):
        h.set_irqs(IrqIndex.MSI, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 1)
    with pytest.raises(Refused):
        h.set_irqs(IrqIndex.ERR, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 1)


async def test_eventfd_for_mask_events_is_not_supported(make: Callable[..., Harness]) -> None:
    h = make()
    fd = eventfd()
    with pytest.raises(Refused) as info:
        h.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_MASK, 0, 1,
                   fds=[fd])
    assert info.value.errno == errno.EOPNOTSUPP
    assert fd.closed


async def test_msix_mask_unmask_and_trigger(make: Callable[..., Harness]) -> None:
    h = make()
    msix = h.function.msix
    assert msix is not None
    fd = eventfd()
    h.set_irqs(IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 1, fds=[OwnedFd(os.dup(fd.fd))])
    msix.set_control(1 << 15)
    h.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 0, 2, b"\1\0")
    assert msix.client_masked(0) and not msix.client_masked(1)
    h.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 1)
    assert msix.pending(0)
    h.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
    assert int.from_bytes(os.read(fd.fd, 8), "little") == 1
    fd.close()


async def test_intx_trigger_mask_unmask(make: Callable[..., Harness]) -> None:
    h = make()
    intx = h.function.intx
    fd = eventfd()
    h.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[OwnedFd(os.dup(fd.fd))])
    intx.set_level(True)
    assert intx.delivered == 1 and intx.masked
    h.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
    assert intx.delivered == 2  # still asserted: fires again
    intx.set_level(False)
    h.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
    h.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 0, 1)
    intx.set_level(True)
    assert intx.delivered == 2
    h.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
    assert intx.delivered == 3
    assert int.from_bytes(os.read(fd.fd, 8), "little") == 3
    fd.close()


async def test_intx_unmask_eventfd_is_kept(make: Callable[..., Harness]) -> None:
    h = make()
    fd = eventfd()
    h.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK, 0, 1,
               fds=[fd])
    assert h.function.intx.unmask_fd is fd
    h.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)
    assert fd.closed


# -- DMA windows ---------------------------------------------------------------------------


def dma_map(h: Harness, iova: int, size: int, fd: OwnedFd | None = None, offset: int = 0,
            flags: int = RW) -> None:
    h.command(Command.DMA_MAP, bytes(DmaMap(32, flags, offset, iova, size)),
              [fd] if fd is not None else [])


def dma_unmap(h: Harness, iova: int, size: int, flags: int = 0) -> bytes:
    return h.command(Command.DMA_UNMAP, bytes(DmaUnmap(24, flags, iova, size)))[0]


async def test_dma_map_with_an_fd_is_mapped_by_iova(make: Callable[..., Harness]) -> None:
    h = make()
    fd = memfd(4 * PAGE)
    os.pwrite(fd.fd, b"hello", 2 * PAGE)
    dma_map(h, 0x1_0000_0000, 2 * PAGE, OwnedFd(os.dup(fd.fd)), offset=2 * PAGE)
    assert h.dma.memory.read(0x1_0000_0000, 5) == b"hello"
    h.dma.memory.write(0x1_0000_0000 + 8, b"back")
    assert os.pread(fd.fd, 4, 2 * PAGE + 8) == b"back"
    assert h.memory_changes == 1
    fd.close()


async def test_dma_map_over_an_existing_window_fails_with_eexist(
        make: Callable[..., Harness]) -> None:
    h = make()
    dma_map(h, 0x10000, 2 * PAGE, memfd())
    fd = memfd()
    with pytest.raises(Refused) as info:
        dma_map(h, 0x11000, 2 * PAGE, fd)
    assert info.value.errno == errno.EEXIST
    assert fd.closed
    with pytest.raises(Refused):
        dma_map(h, 0x10000, PAGE)  # without an fd too
    assert len(h.dma) == 1


async def test_dma_map_of_a_file_too_short_fails(make: Callable[..., Harness]) -> None:
    h = make()
    fd = memfd(PAGE)
    with pytest.raises(Refused):
        dma_map(h, 0x10000, 4 * PAGE, fd)
    assert fd.closed
    assert len(h.dma) == 0


async def test_dma_map_read_only_window(make: Callable[..., Harness]) -> None:
    h = make()
    dma_map(h, 0x10000, PAGE, memfd(), flags=DmaMapFlags.READ)
    view = h.dma.memory.view(0x10000, 16)
    assert view.readonly


async def test_dma_map_without_an_fd_is_only_recorded(make: Callable[..., Harness]) -> None:
    h = make()
    dma_map(h, 0xC0000, 2 * PAGE, flags=DmaMapFlags.READ)
    (region,) = list(h.dma)
    assert region.mapped is None and region.readable and not region.writable
    assert len(h.dma.memory) == 0
    assert h.memory_changes == 0


async def test_dma_unmap_answers_with_the_request(make: Callable[..., Harness]) -> None:
    """"The server responds with the original DMA entry in the request"."""
    h = make()
    dma_map(h, 0x10000, PAGE, memfd())
    assert dma_unmap(h, 0x10000, PAGE) == bytes(DmaUnmap(24, 0, 0x10000, PAGE))
    assert len(h.dma) == 0 and len(h.dma.memory) == 0


@pytest.mark.parametrize(("iova", "size"), [(0x20000, PAGE), (0x10000, PAGE),
                                            (0x11000, PAGE), (0x10000, 4 * PAGE)])
async def test_dma_unmap_of_an_unknown_range_fails_with_enoent(
        make: Callable[..., Harness], iova: int, size: int) -> None:
    h = make()
    dma_map(h, 0x10000, 2 * PAGE, memfd(2 * PAGE))
    with pytest.raises(Refused) as info:
        dma_unmap(h, iova, size)
    assert info.value.errno == errno.ENOENT
    assert len(h.dma) == 1


async def test_dma_unmap_all(make: Callable[..., Harness]) -> None:
    h = make()
    dma_map(h, 0x10000, PAGE, memfd())
    dma_map(h, 0x20000, PAGE)
    dma_unmap(h, 0, 0, DmaUnmapFlags.ALL)
    assert len(h.dma) == 0


# -- region access ---------------------------------------------------------------------------


async def test_config_region_read_and_write(make: Callable[..., Harness]) -> None:
    h = make()
    assert struct.unpack("<HH", h.region_read(RegionIndex.CONFIG, 0, 4)) == (0x1AF4, 0x1044)
    h.region_write(RegionIndex.CONFIG, 0x3C, b"\x0a")
    assert h.region_read(RegionIndex.CONFIG, 0x3C, 1) == b"\x0a"


async def test_bar_region_read_and_write(make: Callable[..., Harness]) -> None:
    h = make()
    h.region_write(RegionIndex.BAR4, COMMON_OFFSET + 20, b"\x01")  # ACKNOWLEDGE
    assert h.region_read(RegionIndex.BAR4, COMMON_OFFSET + 20, 1) == b"\x01"
    h.region_write(RegionIndex.BAR4, COMMON_OFFSET + 20, b"\x03", no_reply=True)
    assert h.region_read(RegionIndex.BAR4, COMMON_OFFSET + 20, 1) == b"\x03"


@pytest.mark.parametrize(("region", "offset", "count"), [
    (RegionIndex.BAR4, 0x4000 - 2, 4), (RegionIndex.CONFIG, 4095, 2), (RegionIndex.ROM, 0, 4),
    (RegionIndex.BAR0, 0, 4), (RegionIndex.VGA, 0, 1), (12, 0, 1),
])
async def test_region_access_outside_a_region_fails(make: Callable[..., Harness], region: int,
                                                     offset: int, count: int) -> None:
    h = make()
    with pytest.raises(Refused) as info:
        h.region_read(region, offset, count)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(Refused):
        h.region_write(region, offset, bytes(count))


async def test_region_write_multi(make: Callable[..., Harness]) -> None:
    h = make(caps={"write_multiple": True})
    writes = [(RegionIndex.BAR4, COMMON_OFFSET + 22, b"\0\0"),
              (RegionIndex.BAR4, COMMON_OFFSET + 20, b"\x01")]
    body = b""
    for region, offset, data in writes:
        one = SingleWrite(offset, region, len(data))
        ctypes.memmove(one.data, data, len(data))
        body += bytes(one)
    payload, _ = h.command(Command.REGION_WRITE_MULTI, bytes(WriteMultiHeader(2)) + body)
    assert WriteMultiHeader.from_buffer_copy(payload).wr_cnt == 2
    assert h.region_read(RegionIndex.BAR4, COMMON_OFFSET + 20, 1) == b"\x01"


async def test_region_write_multi_is_refused_whole(make: Callable[..., Harness]) -> None:
    h = make(caps={"write_multiple": True})
    good = SingleWrite(COMMON_OFFSET + 20, RegionIndex.BAR4, 1)
    good.data[0] = 1
    bad = SingleWrite(0, RegionIndex.ROM, 1)
    with pytest.raises(Refused):
        h.command(Command.REGION_WRITE_MULTI, bytes(WriteMultiHeader(2)) + bytes(good)
                  + bytes(bad))
    assert h.region_read(RegionIndex.BAR4, COMMON_OFFSET + 20, 1) == b"\0"


async def test_device_reset(make: Callable[..., Harness]) -> None:
    h = make()
    h.region_write(RegionIndex.BAR4, COMMON_OFFSET + 20, b"\x01")
    h.region_write(RegionIndex.CONFIG, 0x04, b"\x06\x00")
    h.command(Command.DEVICE_RESET)
    assert h.region_read(RegionIndex.BAR4, COMMON_OFFSET + 20, 1) == b"\0"
    assert h.region_read(RegionIndex.CONFIG, 0x04, 2) == b"\0\0"


class BrokenConfig(RngDevice):
    """A device with a bug in its config space handling."""

    def config(self) -> bytes:
        return bytes(8)

    def write_config(self, offset: int, data: bytes) -> None:
        raise RuntimeError("a bug in the device")


async def test_a_bug_below_the_handler_is_an_eio_reply(make: Callable[..., Harness]) -> None:
    h = make(BrokenConfig())
    with pytest.raises(Refused) as info:
        h.region_write(RegionIndex.BAR4, DEVICE_OFFSET, b"\1")
    assert info.value.errno == errno.EIO
    assert h.region_read(RegionIndex.CONFIG, 0, 2) == b"\xf4\x1a"  # and it goes on
