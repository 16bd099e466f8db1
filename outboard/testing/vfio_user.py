"""A vfio-user client in Python, with a virtio-pci driver on top.

``VfioUserClient`` speaks to any vfio-user server over a real unix socket: one
method per command, replies matched to their commands by message id, and the
server's own commands (DMA_READ / DMA_WRITE) answered from windows the client
mapped without an fd. ``VirtioPciDriver`` drives a virtio-pci function through
it the way a guest driver would: it walks the capability list, negotiates
features through the common configuration, shares ``GuestRam`` with DMA_MAP
and the memfd, takes the queues' notification eventfds from
GET_REGION_IO_FDS, gives every MSI-X vector an eventfd with SET_IRQS, programs
the vector table, and then offers chains and waits on the vectors' eventfds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ..backend.fd import OwnedFd, close_all
from ..backend.pci.config import CapabilityId
from ..backend.pci.virtio_pci import NO_VECTOR, CfgType
from ..backend.virtio import DeviceStatus, Feature
from ..backend.virtqueue.split import full_fence
from ..transports.fdstream import FdStream
from ..transports.vfio_user.connection import pack_header
from ..transports.vfio_user.wire import (
    HEADER_SIZE,
    CapHeader,
    Command,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    HeaderFlags,
    IrqIndex,
    IrqInfo,
    IrqSet,
    IrqSetFlags,
    MessageType,
    RegionAccess,
    RegionIndex,
    RegionInfo,
    RegionIoFds,
    SparseMmapArea,
    SparseMmapHeader,
    SubRegionIoFd,
    VersionHeader,
)
from .driver import Buffer, DriverQueue, Used
from .ram import GuestRam

__all__ = [
    "ClientReply",
    "VfioUserClient",
    "VfioUserClientError",
    "VirtioPciDriver",
    "open_vfio_user_device",
]

_header = struct.Struct("=HHIII")

#: the capabilities the client proposes, as QEMU does (less migration)
CLIENT_CAPABILITIES = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
                       "max_dma_maps": 65535, "write_multiple": True}


class VfioUserClientError(Exception):
    """The server refused a command (``errno``), answered wrongly, or went away."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def _eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))


@dataclass
class ClientReply:
    """A reply from the server: its header fields, payload and fds (now the caller's)."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[OwnedFd]

    @property
    def failed(self) -> bool:
        return bool(self.flags & HeaderFlags.ERROR)

    def close(self) -> None:
        close_all(self.fds)
        self.fds.clear()


class VfioUserClient:
    """Message-level client: one method per command."""

    def __init__(self, stream: FdStream) -> None:
        self.stream = stream
        self.server_caps: dict[str, object] = {}
        self.version: tuple[int, int] | None = None
        #: windows mapped without an fd: the server reaches them with DMA_READ/WRITE
        self.windows: dict[int, bytearray] = {}
        #: DMA_READ / DMA_WRITE commands the server sent, as (command, address, count)
        self.dma_log: list[tuple[Command, int, int]] = []
        self._next_id = 0
        self._waiting: dict[int, tuple[trio.Event, list[ClientReply]]] = {}
        self._send_lock = trio.Lock()
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str) -> AsyncIterator[VfioUserClient]:
        """Connect to the server at ``path``; a reader task runs while inside."""
        async with cls.over(await FdStream.connect(path)) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over(cls, stream: FdStream) -> AsyncIterator[VfioUserClient]:
        """A client on a connected ``stream`` (which it closes at the end)."""
        client = cls(stream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.read_messages)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            client.close()

    def close(self) -> None:
        self._closed = True
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()
        self.stream.close()

    # -- raw messages ------------------------------------------------------

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        async with self._send_lock:
            await self.stream.send(data, fds)

    def _new_id(self) -> int:
        msg_id = self._next_id
        while msg_id in self._waiting:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    async def request(self, command: int, payload: bytes = b"", fds: Sequence[int] = (),
                      *, no_reply: bool = False, check: bool = True) -> ClientReply | None:
        """Send a command; wait for its reply (unless ``no_reply``)."""
        msg_id = self._new_id()
        flags = MessageType.COMMAND | (HeaderFlags.NO_REPLY if no_reply else 0)
        data = pack_header(msg_id, command, HEADER_SIZE + len(payload), flags) + payload
        if no_reply:
            await self.send(data, fds)
            return None
        event = trio.Event()
        slot: list[ClientReply] = []
        self._waiting[msg_id] = (event, slot)
        try:
            await self.send(data, fds)
            await event.wait()
        finally:
            self._waiting.pop(msg_id, None)
        if not slot:
            raise VfioUserClientError(f"the server went away before answering {command}")
        reply = slot[0]
        if reply.command != command:
            reply.close()
            raise VfioUserClientError(f"reply {msg_id} names command {reply.command}")
        if check and reply.failed:
            reply.close()
            name = Command(command).name if command in Command._value2member_map_ \
                else str(command)
            raise VfioUserClientError(f"server refused {name}: errno {reply.error}",
                                      reply.error)
        return reply

    async def _call(self, command: Command, payload: bytes = b"", fds: Sequence[int] = ()
                    ) -> ClientReply:
        reply = await self.request(command, payload, fds)
        assert reply is not None
        return reply

    async def receive_message(self) -> tuple[int, int, int, int, bytes, list[OwnedFd]] | None:
        """One whole message from the server; None at EOF."""
        try:
            head, fds = await self.stream.receive_exactly(HEADER_SIZE)
        except trio.EndOfChannel:
            return None
        msg_id, command, size, flags, error = _header.unpack(head)
        try:
            body, more = await self.stream.receive_exactly(size - HEADER_SIZE) \
                if size > HEADER_SIZE else (b"", [])
        except BaseException:
            close_all(fds)
            raise
        return msg_id, command, flags, error, body, fds + more

    async def read_messages(self) -> None:
        """The reader task: replies wake their waiters, server commands are answered."""
        try:
            while True:
                message = await self.receive_message()
                if message is None:
                    break
                msg_id, command, flags, error, body, fds = message
                if int(flags & HeaderFlags.TYPE_MASK) == MessageType.REPLY:
                    waiter = self._waiting.pop(msg_id, None)
                    reply = ClientReply(msg_id, command, flags, error, body, fds)
                    if waiter is None:
                        reply.close()
                        continue
                    waiter[1].append(reply)
                    waiter[0].set()
                else:
                    close_all(fds)
                    await self._serve_command(msg_id, command, flags, body)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for event, _ in self._waiting.values():
                event.set()

    async def _serve_command(self, msg_id: int, command: int, flags: int, body: bytes) -> None:
        """Answer DMA_READ / DMA_WRITE from the windows mapped without an fd."""
        error = 0
        payload = b""
        if command in (Command.DMA_READ, Command.DMA_WRITE) and len(body) >= 16:
            access = DmaAccess.from_buffer_copy(body)
            self.dma_log.append((Command(command), access.address, access.count))
            found = self._window(access.address, access.count)
            if found is None:
                error = 14  # EFAULT
            elif command == Command.DMA_READ:
                buf, at = found
                payload = bytes(access) + bytes(buf[at:at + access.count])
            else:
                buf, at = found
                data = body[16:16 + access.count]
                buf[at:at + len(data)] = data
                payload = struct.pack("=QI", access.address, access.count)
        else:
            error = 22  # EINVAL
        if flags & HeaderFlags.NO_REPLY:
            return
        if error:
            reply = pack_header(msg_id, command, HEADER_SIZE, MessageType.REPLY
                                | HeaderFlags.ERROR, error)
        else:
            reply = pack_header(msg_id, command, HEADER_SIZE + len(payload),
                                MessageType.REPLY) + payload
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(reply)

    def _window(self, address: int, count: int) -> tuple[bytearray, int] | None:
        for iova, buf in self.windows.items():
            if iova <= address and address + count <= iova + len(buf):
                return buf, address - iova
        return None

    # -- commands ----------------------------------------------------------

    async def negotiate_version(self, caps: dict[str, object] | None = None, *,
                                major: int = 0, minor: int = 0) -> dict[str, object]:
        """VERSION; returns the server's capabilities."""
        body = json.dumps({"capabilities": CLIENT_CAPABILITIES if caps is None else caps})
        reply = await self._call(Command.VERSION, bytes(VersionHeader(major, minor))
                                 + body.encode() + b"\0")
        head = VersionHeader.from_buffer_copy(reply.payload)
        data = reply.payload[4:]
        if not data or data[-1] != 0:
            raise VfioUserClientError(f"VERSION reply data {data!r} is not NUL-terminated")
        self.version = (head.major, head.minor)
        doc = json.loads(data[:-1].decode())
        self.server_caps = dict(doc.get("capabilities", {}))
        return self.server_caps

    async def dma_map(self, iova: int, size: int, *, fd: OwnedFd | None = None,
                      offset: int = 0, flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
                      buffer: bytearray | None = None) -> None:
        """Map a window: with ``fd`` the server maps it, else it reaches ``buffer``
        (kept here) with DMA_READ/DMA_WRITE."""
        payload = bytes(DmaMap(ctypes.sizeof(DmaMap), flags, offset, iova, size))
        await self._call(Command.DMA_MAP, payload, [fd.fd] if fd is not None else [])
        if fd is None:
            self.windows[iova] = buffer if buffer is not None else bytearray(size)

    async def dma_unmap(self, iova: int, size: int, flags: int = 0) -> bytes:
        payload = bytes(DmaUnmap(ctypes.sizeof(DmaUnmap), flags, iova, size))
        reply = await self._call(Command.DMA_UNMAP, payload)
        self.windows.pop(iova, None)
        return reply.payload

    async def get_info(self) -> DeviceInfo:
        reply = await self._call(Command.DEVICE_GET_INFO,
                                 bytes(DeviceInfo(ctypes.sizeof(DeviceInfo), 0, 0, 0)))
        return DeviceInfo.from_buffer_copy(reply.payload)

    async def get_region_info(self, index: int, argsz: int = 256
                              ) -> tuple[RegionInfo, list[tuple[int, int]], OwnedFd | None]:
        """The region's info, its sparse mmap areas (if any) and its fd (if mappable)."""
        reply = await self._call(Command.DEVICE_GET_REGION_INFO,
                                 bytes(RegionInfo(argsz, 0, index, 0, 0, 0)))
        info = RegionInfo.from_buffer_copy(reply.payload)
        areas: list[tuple[int, int]] = []
        at = info.cap_offset if info.flags & 8 else 0
        while at and at + ctypes.sizeof(CapHeader) <= len(reply.payload):
            cap = CapHeader.from_buffer_copy(reply.payload, at)
            if cap.id == 1:  # VFIO_REGION_INFO_CAP_SPARSE_MMAP
                head = SparseMmapHeader.from_buffer_copy(reply.payload, at + 8)
                for i in range(head.nr_areas):
                    area = SparseMmapArea.from_buffer_copy(reply.payload, at + 16 + 16 * i)
                    areas.append((area.offset, area.size))
            at = cap.next
        fd = reply.fds.pop(0) if reply.fds else None
        reply.close()
        return info, areas, fd

    async def get_region_io_fds(self, index: int, argsz: int = 4096
                                ) -> list[tuple[SubRegionIoFd, OwnedFd]]:
        reply = await self._call(Command.DEVICE_GET_REGION_IO_FDS,
                                 bytes(RegionIoFds(argsz, 0, index, 0)))
        head = RegionIoFds.from_buffer_copy(reply.payload)
        subs = []
        step = ctypes.sizeof(SubRegionIoFd)
        base = ctypes.sizeof(RegionIoFds)
        if len(reply.payload) >= base + head.count * step:
            for i in range(head.count):
                sub = SubRegionIoFd.from_buffer_copy(reply.payload, base + i * step)
                subs.append(sub)
        fds = reply.fds
        out = [(sub, fds[sub.fd_index]) for sub in subs if sub.fd_index < len(fds)]
        # An fd shared by several sub-regions is listed once per sub-region.
        owned = {id(fd) for _, fd in out}
        close_all(fd for fd in fds if id(fd) not in owned)
        return out

    async def get_irq_info(self, index: int) -> IrqInfo:
        reply = await self._call(Command.DEVICE_GET_IRQ_INFO,
                                 bytes(IrqInfo(ctypes.sizeof(IrqInfo), 0, index, 0)))
        return IrqInfo.from_buffer_copy(reply.payload)

    async def set_irqs(self, index: int, flags: int, start: int, count: int, *,
                       fds: Sequence[OwnedFd] = (), data: bytes = b"") -> None:
        argsz = ctypes.sizeof(IrqSet) + len(data)
        await self._call(Command.DEVICE_SET_IRQS,
                         bytes(IrqSet(argsz, flags, index, start, count)) + data,
                         [fd.fd for fd in fds])

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = await self._call(Command.REGION_READ,
                                 bytes(RegionAccess(offset, region, count)))
        access = RegionAccess.from_buffer_copy(reply.payload)
        data = reply.payload[16:]
        if access.count != count or len(data) != count:
            raise VfioUserClientError(f"REGION_READ of {count} bytes answered with "
                                      f"{len(data)} ({access.count})")
        return data

    async def region_write(self, region: int, offset: int, data: bytes, *,
                           no_reply: bool = False) -> None:
        await self.request(Command.REGION_WRITE,
                           bytes(RegionAccess(offset, region, len(data))) + data,
                           no_reply=no_reply)

    async def reset(self) -> None:
        await self._call(Command.DEVICE_RESET)

    async def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(await self.region_read(RegionIndex.CONFIG, offset, size),
                              "little")

    async def config_write(self, offset: int, size: int, value: int) -> None:
        await self.region_write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))


@dataclass(frozen=True)
class VirtioCap:
    """Where one virtio structure is: a BAR, an offset and a length."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int


# struct virtio_pci_common_cfg: field -> (offset, width)
COMMON = {
    "device_feature_select": (0, 4), "device_feature": (4, 4),
    "driver_feature_select": (8, 4), "driver_feature": (12, 4),
    "config_msix_vector": (16, 2), "num_queues": (18, 2), "device_status": (20, 1),
    "config_generation": (21, 1), "queue_select": (22, 2), "queue_size": (24, 2),
    "queue_msix_vector": (26, 2), "queue_enable": (28, 2), "queue_notify_off": (30, 2),
    "queue_desc": (32, 8), "queue_driver": (40, 8), "queue_device": (48, 8),
}

#: the message address of an x86 MSI (any value works: the client delivers)
MSI_ADDRESS = 0xFEE0_0000


class VirtioPciDriver:
    """A virtio driver over a ``VfioUserClient``: the function's capabilities,
    negotiation, rings, kicks and interrupts."""

    def __init__(self, client: VfioUserClient, ram: GuestRam) -> None:
        self.client = client
        self.ram = ram
        self.caps: dict[int, VirtioCap] = {}
        self.notify_multiplier = 0
        self.msix_cap = 0
        self.msix_count = 0
        self.msix_table: tuple[int, int] = (0, 0)  # (bar, offset)
        self.msix_pba: tuple[int, int] = (0, 0)
        self.capability_ids: list[int] = []
        self.features = 0
        self.offered = 0
        self.queues: list[DriverQueue] = []
        #: queue index -> its notification eventfd (GET_REGION_IO_FDS), if any
        self.notify_fds: dict[int, OwnedFd] = {}
        self.vectors: list[OwnedFd] = []
        self.intx: OwnedFd | None = None
        self.use_msix = True

    # -- discovery ---------------------------------------------------------

    async def probe(self) -> None:
        """Read the config space and walk its capability list (virtio 1.2, 4.1.4)."""
        client = self.client
        config = await client.region_read(RegionIndex.CONFIG, 0, 256)
        offset = config[0x34] & ~3 if config[0x06] & 0x10 else 0
        while offset:
            cap_id, nxt = config[offset], config[offset + 1]
            self.capability_ids.append(cap_id)
            if cap_id == CapabilityId.VENDOR_SPECIFIC:
                cfg_type, bar = config[offset + 3], config[offset + 4]
                at, length = struct.unpack_from("<II", config, offset + 8)
                cap = VirtioCap(cfg_type, bar, at, length, offset)
                self.caps.setdefault(cfg_type, cap)  # the first of each type is preferred
                if cfg_type == CfgType.NOTIFY_CFG:
                    self.notify_multiplier = struct.unpack_from("<I", config, offset + 16)[0]
            elif cap_id == CapabilityId.MSIX:
                control, table, pba = struct.unpack_from("<HII", config, offset + 2)
                self.msix_cap = offset
                self.msix_count = (control & 0x7FF) + 1
                self.msix_table = (table & 7, table & ~7)
                self.msix_pba = (pba & 7, pba & ~7)
            offset = nxt & ~3
        for needed in (CfgType.COMMON_CFG, CfgType.NOTIFY_CFG, CfgType.ISR_CFG):
            if needed not in self.caps:
                raise VfioUserClientError(f"no virtio capability of type {needed}")

    # -- register access ---------------------------------------------------

    async def _read(self, cfg_type: int, offset: int, size: int) -> int:
        cap = self.caps[cfg_type]
        data = await self.client.region_read(cap.bar, cap.offset + offset, size)
        return int.from_bytes(data, "little")

    async def _write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        cap = self.caps[cfg_type]
        await self.client.region_write(cap.bar, cap.offset + offset,
                                       value.to_bytes(size, "little"))

    async def read_common(self, field: str) -> int:
        offset, width = COMMON[field]
        if width == 8:  # as Linux does: two 32-bit accesses
            low = await self._read(CfgType.COMMON_CFG, offset, 4)
            return low | await self._read(CfgType.COMMON_CFG, offset + 4, 4) << 32
        return await self._read(CfgType.COMMON_CFG, offset, width)

    async def write_common(self, field: str, value: int) -> None:
        offset, width = COMMON[field]
        if width == 8:
            await self._write(CfgType.COMMON_CFG, offset, 4, value & 0xFFFF_FFFF)
            await self._write(CfgType.COMMON_CFG, offset + 4, 4, value >> 32)
            return
        await self._write(CfgType.COMMON_CFG, offset, width, value)

    async def read_isr(self) -> int:
        return await self._read(CfgType.ISR_CFG, 0, 1)

    async def read_device_config(self, offset: int, size: int) -> bytes:
        cap = self.caps[CfgType.DEVICE_CFG]
        return await self.client.region_read(cap.bar, cap.offset + offset, size)

    async def write_device_config(self, offset: int, data: bytes) -> None:
        cap = self.caps[CfgType.DEVICE_CFG]
        await self.client.region_write(cap.bar, cap.offset + offset, data)

    # -- interrupts --------------------------------------------------------

    async def setup_msix(self) -> None:
        """An eventfd per vector, MSI-X enabled, every table entry programmed and unmasked."""
        client = self.client
        self.vectors = [_eventfd() for _ in range(self.msix_count)]
        await client.set_irqs(IrqIndex.MSIX, IrqSetFlags.DATA_EVENTFD
                              | IrqSetFlags.ACTION_TRIGGER, 0, self.msix_count,
                              fds=self.vectors)
        await self.set_msix_control(enable=True, function_mask=False)
        for vector in range(self.msix_count):
            await self.write_table_entry(vector, MSI_ADDRESS, vector, masked=False)
        self.use_msix = True

    async def set_msix_control(self, *, enable: bool, function_mask: bool) -> None:
        control = await self.client.config_read(self.msix_cap + 2, 2)
        control = control & 0x3FFF | (1 << 15 if enable else 0) | (1 << 14 if function_mask
                                                                      else 0)
        await self.client.config_write(self.msix_cap + 2, 2, control)

    async def write_table_entry(self, vector: int, address: int, data: int, *,
                                masked: bool) -> None:
        bar, base = self.msix_table
        entry = struct.pack("<QII", address, data, 1 if masked else 0)
        await self.client.region_write(bar, base + 16 * vector, entry)

    async def mask_vector(self, vector: int, masked: bool) -> None:
        bar, base = self.msix_table
        await self.client.region_write(bar, base + 16 * vector + 12,
                                       (1 if masked else 0).to_bytes(4, "little"))

    async def read_pba(self) -> int:
        bar, base = self.msix_pba
        size = 8 * ((self.msix_count + 63) // 64)
        return int.from_bytes(await self.client.region_read(bar, base, size), "little")

    async def setup_intx(self) -> None:
        """INTx instead of MSI-X: one eventfd, MSI-X left disabled."""
        self.intx = _eventfd()
        await self.client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_EVENTFD
                                   | IrqSetFlags.ACTION_TRIGGER, 0, 1, fds=[self.intx])
        self.use_msix = False

    # -- virtio initialisation (3.1.1) -------------------------------------

    async def set_status(self, status: int) -> None:
        await self.write_common("device_status", status)

    async def negotiate(self, want: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked)."""
        await self.set_status(0)
        if await self.read_common("device_status") != 0:
            raise VfioUserClientError("device did not reset")
        status = DeviceStatus.ACKNOWLEDGE
        await self.set_status(status)
        status |= DeviceStatus.DRIVER
        await self.set_status(status)
        offered = 0
        for select in (0, 1):
            await self.write_common("device_feature_select", select)
            offered |= await self.read_common("device_feature") << (32 * select)
        self.offered = offered
        features = offered if want is None else offered & want
        for select in (0, 1):
            await self.write_common("driver_feature_select", select)
            await self.write_common("driver_feature", features >> (32 * select) & 0xFFFF_FFFF)
        status |= DeviceStatus.FEATURES_OK
        await self.set_status(status)
        if not await self.read_common("device_status") & DeviceStatus.FEATURES_OK:
            raise VfioUserClientError(f"device refused features {features:#x}")
        self.features = features
        return features

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> Feature.RING_EVENT_IDX & 1)

    async def map_ram(self) -> None:
        await self.client.dma_map(self.ram.gpa, self.ram.size, fd=self.ram.fd)

    async def take_notify_fds(self) -> None:
        """The notification eventfds, so that kicks never cross the socket."""
        cap = self.caps[CfgType.NOTIFY_CFG]
        multiplier = self.notify_multiplier
        for sub, fd in await self.client.get_region_io_fds(cap.bar):
            index = (sub.offset - cap.offset) // multiplier if multiplier else 0
            old = self.notify_fds.pop(index, None)
            if old is not None and old is not fd:
                old.close()
            self.notify_fds[index] = fd

    async def start(self, queue_sizes: Sequence[int], *, config_vector: int = 0) -> None:
        """Lay out and enable the queues (vector ``i + 1`` for queue ``i``), DRIVER_OK."""
        use_msix = self.use_msix
        if use_msix:
            await self.write_common("config_msix_vector", config_vector)
        for index, size in enumerate(queue_sizes):
            await self.write_common("queue_select", index)
            max_size = await self.read_common("queue_size")
            if not max_size or size > max_size:
                raise VfioUserClientError(f"queue {index}: size {size}, device allows "
                                          f"{max_size}")
            q = DriverQueue(self.ram, size, event_idx=self.event_idx)
            self.queues.append(q)
            await self.write_common("queue_size", size)
            if use_msix:
                vector = index + 1 if index + 1 < self.msix_count else NO_VECTOR
                await self.write_common("queue_msix_vector", vector)
            await self.write_common("queue_desc", q.desc_gpa)
            await self.write_common("queue_driver", q.avail_gpa)
            await self.write_common("queue_device", q.used_gpa)
            await self.write_common("queue_enable", 1)
        status = await self.read_common("device_status")
        await self.set_status(status | DeviceStatus.DRIVER_OK)

    async def notify(self, index: int) -> None:
        """Notify the device through the notification area (a region write)."""
        cap = self.caps[CfgType.NOTIFY_CFG]
        await self.client.region_write(cap.bar, cap.offset + index * self.notify_multiplier,
                                       index.to_bytes(2, "little"))

    async def kick(self, index: int) -> None:
        """Publish the avail index; notify if the device asked for it — through the
        ioeventfd when there is one, else with a region write."""
        if not self.queues[index].publish():
            return
        fd = self.notify_fds.get(index)
        if fd is not None:
            os.write(fd.fd, (1).to_bytes(8, "little"))
        else:
            await self.notify(index)

    def offer(self, index: int, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        return self.queues[index].offer(buffers, indirect=indirect)

    def vector_of(self, index: int) -> int:
        return index + 1 if index + 1 < self.msix_count else NO_VECTOR

    async def wait_interrupt(self, index: int) -> None:
        """Wait for the next interrupt of queue ``index`` (its vector, or INTx)."""
        if self.use_msix:
            fd = self.vectors[self.vector_of(index)].fd
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.read(fd, 8)
                    return
                except BlockingIOError:
                    continue
        assert self.intx is not None
        fd = self.intx.fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.read(fd, 8)
                break
            except BlockingIOError:
                continue
        # The handler of a level interrupt: read the ISR (deasserts), then EOI.
        await self.read_isr()
        await self.client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE
                                   | IrqSetFlags.ACTION_UNMASK, 0, 1)

    async def wait_used(self, index: int, count: int = 1) -> list[Used]:
        """Wait for interrupts until ``count`` completions have arrived."""
        q = self.queues[index]
        out = q.collect()
        while len(out) < count:
            if q.event_idx:
                q.set_used_event(q.last_used_idx)
                full_fence()
                more = q.collect()
                if more:
                    out += more
                    continue
            await self.wait_interrupt(index)
            out += q.collect()
        return out

    def close(self) -> None:
        close_all(self.vectors)
        self.vectors = []
        close_all(self.notify_fds.values())
        self.notify_fds.clear()
        if self.intx is not None:
            self.intx.close()
            self.intx = None


@asynccontextmanager
async def open_vfio_user_device(path: str, queue_sizes: Sequence[int], *,
                                ram_size: int = 16 << 20, features: int | None = None,
                                msix: bool = True, ioeventfds: bool = True
                                ) -> AsyncIterator[VirtioPciDriver]:
    """Connect to a vfio-user server at ``path`` and bring its virtio device up."""
    ram = GuestRam(ram_size, gpa=0x1_0000_0000)
    try:
        async with VfioUserClient.connect(path) as client:
            driver = VirtioPciDriver(client, ram)
            try:
                await client.negotiate_version()
                await driver.probe()
                await driver.map_ram()
                if ioeventfds:
                    await driver.take_notify_fds()
                if msix:
                    await driver.setup_msix()
                else:
                    await driver.setup_intx()
                await driver.negotiate(features)
                await driver.start(queue_sizes)
                yield driver
            finally:
                driver.close()
    finally:
        ram.close()
