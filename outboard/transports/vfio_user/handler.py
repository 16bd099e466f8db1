"""Applies vfio-user commands to a PCI function: DMA windows, regions, interrupts.

This is the server's command table in code. It runs in the connection's trio
task but never awaits: each command is applied whole before the next one. An
answer is the bytes of the reply and the fds to send with it (borrowed: they
stay owned by the function).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence

from ...backend.errors import OutboardError
from ...backend.fd import OwnedFd
from ...backend.pci.function import PciFunction
from .connection import CommandFailed, Request, ServerConnection, writes_of
from .dma import DmaTable
from .wire import (
    EINVAL,
    EIO,
    ENOTSUP,
    NUM_PCI_REGIONS,
    CapHeader,
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaMap,
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
    SparseMmapArea,
    SparseMmapHeader,
    SubRegionIoFd,
    WriteMultiHeader,
)

__all__ = ["Answer", "VfioUserHandler"]

log = logging.getLogger("outboard.vfio_user")

#: the bytes of a reply and the fds that go with it (borrowed)
Answer = tuple[bytes, Sequence[int]]

#: KVM_IOEVENTFD_FLAG_DATAMATCH
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
#: the interrupt types this server reports (INTx, MSI, MSI-X)
NUM_IRQS = IrqIndex.MSIX + 1
BAR_REGIONS = range(RegionIndex.BAR0, RegionIndex.BAR5 + 1)
#: commands a client sends to find out what exists (QEMU asks for the ERR and REQ
#: interrupt types, for one): a refusal is an answer, not a fault
_PROBES = {Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_IO_FDS,
           Command.DEVICE_GET_IRQ_INFO, Command.DMA_UNMAP}


class VfioUserHandler:
    """One connection's view of the function."""

    def __init__(self, conn: ServerConnection, function: PciFunction, dma: DmaTable, *,
                 memory_changed: Callable[[], None] = lambda: None) -> None:
        self.conn = conn
        self.function = function
        self.dma = dma
        self.memory_changed = memory_changed
        #: how a new INTx unmask eventfd is installed (the server watches it)
        self.set_intx_unmask_fd: Callable[[OwnedFd | None], None] = \
            function.intx.set_unmask_fd
        self._handlers: dict[Command, Callable[[Request], Answer | bytes | None]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.DEVICE_RESET: self._device_reset,
        }

    # -- dispatch ----------------------------------------------------------

    def dispatch(self, req: Request) -> Answer | None:
        """Apply ``req``; return the reply to send (None for No_reply commands)."""
        log.debug("<- %s id=%d size=%d fds=%d%s", req.command.name, req.msg_id,
                  len(req.payload), len(req.fds), " (no reply)" if req.no_reply else "")
        try:
            handler = self._handlers.get(req.command)
            if handler is None:
                raise CommandFailed(ENOTSUP, "not supported by this server")
            answer = handler(req)
        except OutboardError as exc:
            errno = exc.errno if isinstance(exc, CommandFailed) else EINVAL
            level = logging.DEBUG if req.command in _PROBES else logging.WARNING
            log.log(level, "%s refused (errno %d): %s", req.command.name, errno, exc)
            reply = self.conn.error(req, errno)
            return (reply, ()) if reply is not None else None
        except Exception:
            # A bug below (in a device, say): the client is told, the server goes on.
            log.exception("%s failed", req.command.name)
            reply = self.conn.error(req, EIO)
            return (reply, ()) if reply is not None else None
        finally:
            req.close()  # any fd a handler did not take
        if answer is None:
            answer = b""
        if isinstance(answer, bytes):
            reply = self.conn.reply(req, answer)
            return (reply, ()) if reply is not None else None
        payload, fds = answer
        reply = self.conn.reply(req, payload)
        return (reply, fds) if reply is not None else None

    # -- session -----------------------------------------------------------

    def _version(self, req: Request) -> bytes:
        payload = self.conn.negotiate_version(req)
        log.info("client speaks vfio-user %d.%d: %s", *(self.conn.version or (0, 0)),
                 self.conn.client)
        return payload

    # -- DMA ---------------------------------------------------------------

    def _dma_map(self, req: Request) -> None:
        m = DmaMap.from_buffer_copy(req.payload)
        fds = req.take_fds()
        region = self.dma.map(m.address, m.size, m.flags, m.offset, fds[0] if fds else None)
        log.debug("DMA window %#x+%#x flags %#x %s", m.address, m.size, m.flags,
                  "mapped" if region.mapped is not None else "by message")
        if region.mapped is not None:
            self.memory_changed()

    def _dma_unmap(self, req: Request) -> bytes:
        u = DmaUnmap.from_buffer_copy(req.payload)
        if u.flags & DmaUnmapFlags.ALL:
            regions = self.dma.unmap_all()
        else:
            regions = [self.dma.unmap(u.address, u.size)]
        # "the server must release all references to that DMA region before
        # replying": the queues let go of their views first.
        self.memory_changed()
        for region in regions:
            region.release()
        # "The server responds with the original DMA entry in the request."
        return req.payload

    # -- device information ------------------------------------------------

    def _get_info(self, req: Request) -> bytes:
        return bytes(DeviceInfo(ctypes.sizeof(DeviceInfo), DeviceFlags.RESET | DeviceFlags.PCI,
                                NUM_PCI_REGIONS, NUM_IRQS))

    def _region_size(self, index: int) -> int:
        if index in BAR_REGIONS:
            return self.function.bar_size(index)
        if index == RegionIndex.CONFIG:
            return self.function.config.size
        return 0

    def _get_region_info(self, req: Request) -> Answer:
        query = RegionInfo.from_buffer_copy(req.payload)
        index = query.index
        if index >= NUM_PCI_REGIONS:
            raise CommandFailed(EINVAL, f"no region {index}")
        size = self._region_size(index)
        flags = RegionInfoFlags.READ | RegionInfoFlags.WRITE if size else 0
        caps = b""
        fds: list[int] = []
        bar = self.function.bars.get(index) if index in BAR_REGIONS else None
        if bar is not None and bar.mmap_areas and bar.mmap_fd is not None:
            # VFIO_REGION_INFO_CAP_SPARSE_MMAP: only these parts may be mapped.
            flags |= RegionInfoFlags.MMAP | RegionInfoFlags.CAPS
            areas = b"".join(bytes(SparseMmapArea(o, s)) for o, s in bar.mmap_areas)
            caps = bytes(CapHeader(RegionCap.SPARSE_MMAP, 1, 0)) + bytes(
                SparseMmapHeader(len(bar.mmap_areas), 0)) + areas
            fds = [bar.mmap_fd.fd]
        fixed = ctypes.sizeof(RegionInfo)
        needed = fixed + len(caps)
        cap_offset = fixed if caps else 0
        info = RegionInfo(needed, flags, index, cap_offset, size, 0)
        if query.argsz < needed:
            # "the full payload is not included in the reply, but the argsz
            # field in the reply indicates the needed size" (Message sizes).
            return bytes(info), fds
        return bytes(info) + caps, fds

    def _get_region_io_fds(self, req: Request) -> Answer:
        query = RegionIoFds.from_buffer_copy(req.payload)
        index = query.index
        if index >= NUM_PCI_REGIONS:
            raise CommandFailed(EINVAL, f"no region {index}")
        io_fds = self.function.ioeventfds(index) if index in BAR_REGIONS else []
        if not io_fds:
            # "The reply message will additionally include at least one file
            # descriptor": a region without any has no answer but an error.
            raise CommandFailed(EINVAL, f"region {index} has no ioeventfds")
        io_fds = io_fds[:max(self.conn.client.max_msg_fds, 1)]
        step = ctypes.sizeof(SubRegionIoFd)
        needed = ctypes.sizeof(RegionIoFds) + step * len(io_fds)
        head = RegionIoFds(needed, 0, index, len(io_fds))
        if query.argsz < needed:
            return bytes(head), ()
        subs = b"".join(
            bytes(SubRegionIoFd(io.offset, io.size, i, IoFdType.IOEVENTFD,
                                IOEVENTFD_FLAG_DATAMATCH if io.datamatch is not None else 0, 0,
                                io.datamatch or 0))
            for i, io in enumerate(io_fds))
        return bytes(head) + subs, [io.fd.fd for io in io_fds]

    # -- interrupts --------------------------------------------------------

    def _irq_count(self, index: int) -> int:
        if index == IrqIndex.INTX:
            return 1
        if index == IrqIndex.MSIX and self.function.msix is not None:
            return self.function.msix.count
        return 0

    def _get_irq_info(self, req: Request) -> bytes:
        index = IrqInfo.from_buffer_copy(req.payload).index
        if index >= NUM_IRQS:
            raise CommandFailed(EINVAL, f"no interrupt type {index}")
        flags = IrqInfoFlags.EVENTFD
        if index == IrqIndex.INTX:
            flags |= IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        elif index == IrqIndex.MSIX:
            flags |= IrqInfoFlags.MASKABLE
        return bytes(IrqInfo(ctypes.sizeof(IrqInfo), flags, index, self._irq_count(index)))

    def _set_irqs(self, req: Request) -> None:
        s = IrqSet.from_buffer_copy(req.payload)
        index, start, count = s.index, s.start, s.count
        log.debug("SET_IRQS index %d start %d count %d flags %s", index, start, count,
                  IrqSetFlags(s.flags))
        if index >= NUM_IRQS:
            raise CommandFailed(EINVAL, f"no interrupt type {index}")
        data_kind = s.flags & int(IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL
                                  | IrqSetFlags.DATA_EVENTFD)
        action = s.flags & ~data_kind
        intx = self.function.intx
        msix = self.function.msix
        if count == 0:
            # DATA_NONE | ACTION_TRIGGER with count 0: disable the whole type.
            if index == IrqIndex.INTX:
                intx.set_trigger_fd(None)
                self.set_intx_unmask_fd(None)
            elif index == IrqIndex.MSIX and msix is not None:
                for vector in range(msix.count):
                    msix.set_eventfd(vector, None)
            return
        if start + count > self._irq_count(index):
            raise CommandFailed(EINVAL, f"interrupts {start}..{start + count - 1} of type "
                                        f"{index} (it has {self._irq_count(index)})")
        vectors = range(start, start + count)
        if data_kind == IrqSetFlags.DATA_EVENTFD:
            fds: list[OwnedFd | None] = list(req.take_fds()) or [None] * count
            try:
                self._assign_eventfds(index, action, vectors, fds)
            finally:
                for fd in fds:  # those not handed over
                    if fd is not None:
                        fd.close()
            return
        if data_kind == IrqSetFlags.DATA_BOOL:
            selected = [v for v, flag in zip(vectors, req.data, strict=True) if flag]
        else:
            selected = list(vectors)
        for vector in selected:
            if index == IrqIndex.INTX:
                {IrqSetFlags.ACTION_TRIGGER: intx.trigger, IrqSetFlags.ACTION_MASK: intx.mask,
                 IrqSetFlags.ACTION_UNMASK: intx.unmask}[IrqSetFlags(action)]()
            else:
                assert msix is not None
                {IrqSetFlags.ACTION_TRIGGER: msix.trigger,
                 IrqSetFlags.ACTION_MASK: msix.client_mask,
                 IrqSetFlags.ACTION_UNMASK: msix.client_unmask}[IrqSetFlags(action)](vector)

    def _assign_eventfds(self, index: int, action: int, vectors: range,
                         fds: list[OwnedFd | None]) -> None:
        """Hand ``fds`` over one by one (each slot is emptied once it is owned)."""
        intx = self.function.intx
        if action == IrqSetFlags.ACTION_TRIGGER:
            for i, vector in enumerate(vectors):
                fd, fds[i] = fds[i], None
                if index == IrqIndex.INTX:
                    intx.set_trigger_fd(fd)
                else:
                    assert self.function.msix is not None
                    self.function.msix.set_eventfd(vector, fd)
            return
        if action == IrqSetFlags.ACTION_UNMASK and index == IrqIndex.INTX:
            # The kernel's meaning (QEMU's resample eventfd): a write to it unmasks.
            fd, fds[0] = fds[0], None
            self.set_intx_unmask_fd(fd)
            return
        raise CommandFailed(ENOTSUP, "an eventfd for mask events is not supported")

    # -- region access -----------------------------------------------------

    def _check_access(self, region: int, offset: int, count: int) -> None:
        size = self._region_size(region)
        if region >= NUM_PCI_REGIONS or not size:
            raise CommandFailed(EINVAL, f"no region {region}")
        if offset + count > size:
            raise CommandFailed(EINVAL, f"access {offset:#x}+{count} outside region {region} "
                                        f"({size:#x} bytes)")

    def _read(self, region: int, offset: int, count: int) -> bytes:
        self._check_access(region, offset, count)
        if region == RegionIndex.CONFIG:
            return self.function.config.read(offset, count)
        return self.function.bar_read(region, offset, count)

    def _write(self, region: int, offset: int, data: bytes) -> None:
        self._check_access(region, offset, len(data))
        if region == RegionIndex.CONFIG:
            self.function.config.write(offset, data)
        else:
            self.function.bar_write(region, offset, data)

    def _region_read(self, req: Request) -> bytes:
        a = RegionAccess.from_buffer_copy(req.payload)
        data = self._read(a.region, a.offset, a.count)
        return bytes(a) + data

    def _region_write(self, req: Request) -> bytes:
        a = RegionAccess.from_buffer_copy(req.payload)
        self._write(a.region, a.offset, req.data)
        return bytes(a)

    def _region_write_multi(self, req: Request) -> bytes:
        writes = writes_of(req)
        for region, offset, data in writes:
            self._check_access(region, offset, len(data))
        for region, offset, data in writes:
            self._write(region, offset, data)
        return bytes(WriteMultiHeader(len(writes)))

    # -- reset -------------------------------------------------------------

    def _device_reset(self, req: Request) -> None:
        log.info("device reset by the client")
        self.function.reset()

    def close(self) -> None:
        self.set_intx_unmask_fd(None)

