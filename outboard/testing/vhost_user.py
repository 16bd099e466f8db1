"""A vhost-user front-end in Python, with a small virtio driver on top.

It speaks to any vhost-user back-end over a real unix socket: memfd guest RAM,
real kick and call eventfds, the message sequence QEMU uses. Tests use it to
exercise devices without a VM.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType

import trio

from ..backend.fd import OwnedFd, close_all
from ..backend.virtio import DeviceStatus, Feature, bit
from ..backend.virtqueue.split import full_fence
from ..transports.fdstream import FdStream
from ..transports.vhost_user.wire import (
    HEADER_SIZE,
    REQUESTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    ConfigHeader,
    Flags,
    FrontendReq,
    MemoryRegionDescription,
    MemoryTableHeader,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddress,
    VringState,
)
from .driver import Buffer, DriverQueue, Used
from .ram import GuestRam

__all__ = ["FrontendError", "VhostUserDriver", "VhostUserFrontend", "open_device"]

_header = struct.Struct("=III")
_u64 = struct.Struct("=Q")


class FrontendError(Exception):
    """The back-end answered wrongly, refused a request, or went away."""


def _eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))


class VhostUserFrontend:
    """Message-level front-end: one method per request."""

    def __init__(self, stream: FdStream) -> None:
        self.stream = stream
        self.protocol_features = 0
        self.need_reply_default = False

    @classmethod
    async def connect(cls, path: str) -> VhostUserFrontend:
        return cls(await FdStream.connect(path))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> VhostUserFrontend:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- raw messages ------------------------------------------------------

    async def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                   *, flags: int = VHOST_USER_VERSION) -> None:
        await self.stream.send(_header.pack(request, flags, len(payload)) + payload, fds)

    async def receive_reply(self, request: int) -> bytes:
        head, fds = await self.stream.receive_exactly(HEADER_SIZE)
        close_all(fds)
        code, flags, size = _header.unpack(head)
        if code != request or not flags & Flags.REPLY:
            raise FrontendError(f"reply to {request} has request {code}, flags {flags:#x}")
        body, fds = await self.stream.receive_exactly(size) if size else (b"", [])
        close_all(fds)
        return body

    async def request(self, request: FrontendReq, payload: bytes = b"",
                      fds: Sequence[int] = (), *, need_reply: bool | None = None) -> bytes | None:
        """Send one request; return its reply payload (or check its ack)."""
        rule = REQUESTS[request]
        if need_reply is None:
            need_reply = self.need_reply_default and not rule.replies
        flags = VHOST_USER_VERSION | (Flags.NEED_REPLY if need_reply else 0)
        await self.send(request, payload, fds, flags=flags)
        if rule.replies:
            return await self.receive_reply(request)
        if need_reply:
            body = await self.receive_reply(request)
            if len(body) != 8 or _u64.unpack(body)[0] != 0:
                raise FrontendError(f"back-end refused {request.name}")
        return None

    async def _u64_reply(self, request: FrontendReq) -> int:
        body = await self.request(request)
        if body is None or len(body) != 8:
            raise FrontendError(f"{request.name} reply of {body!r}")
        value: int = _u64.unpack(body)[0]
        return value

    # -- requests ----------------------------------------------------------

    async def get_features(self) -> int:
        return await self._u64_reply(FrontendReq.GET_FEATURES)

    async def set_features(self, features: int) -> None:
        await self.request(FrontendReq.SET_FEATURES, _u64.pack(features))

    async def get_protocol_features(self) -> int:
        return await self._u64_reply(FrontendReq.GET_PROTOCOL_FEATURES)

    async def set_protocol_features(self, features: int) -> None:
        await self.request(FrontendReq.SET_PROTOCOL_FEATURES, _u64.pack(features))
        self.protocol_features = features
        self.need_reply_default = bool(features >> ProtocolFeature.REPLY_ACK & 1)

    async def set_owner(self) -> None:
        await self.request(FrontendReq.SET_OWNER)

    async def get_queue_num(self) -> int:
        return await self._u64_reply(FrontendReq.GET_QUEUE_NUM)

    async def get_max_mem_slots(self) -> int:
        return await self._u64_reply(FrontendReq.GET_MAX_MEM_SLOTS)

    async def set_mem_table(self, rams: Sequence[GuestRam]) -> None:
        payload = bytes(MemoryTableHeader(len(rams), 0)) + b"".join(
            bytes(MemoryRegionDescription(r.gpa, r.size, r.uva, 0)) for r in rams)
        await self.request(FrontendReq.SET_MEM_TABLE, payload, [r.fd.fd for r in rams])

    async def add_mem_reg(self, ram: GuestRam) -> None:
        region = SingleMemoryRegion(0, MemoryRegionDescription(ram.gpa, ram.size, ram.uva, 0))
        await self.request(FrontendReq.ADD_MEM_REG, bytes(region), [ram.fd.fd])

    async def rem_mem_reg(self, ram: GuestRam) -> None:
        region = SingleMemoryRegion(0, MemoryRegionDescription(ram.gpa, ram.size, ram.uva, 0))
        await self.request(FrontendReq.REM_MEM_REG, bytes(region))

    async def set_vring_num(self, index: int, num: int) -> None:
        await self.request(FrontendReq.SET_VRING_NUM, bytes(VringState(index, num)))

    async def set_vring_base(self, index: int, base: int) -> None:
        await self.request(FrontendReq.SET_VRING_BASE, bytes(VringState(index, base)))

    async def get_vring_base(self, index: int) -> int:
        body = await self.request(FrontendReq.GET_VRING_BASE, bytes(VringState(index, 0)))
        assert body is not None
        state = VringState.from_buffer_copy(body)
        if state.index != index:
            raise FrontendError(f"GET_VRING_BASE answered for queue {state.index}")
        return int(state.num)

    async def set_vring_addr(self, index: int, desc_uva: int, used_uva: int,
                             avail_uva: int) -> None:
        addr = VringAddress(index, 0, desc_uva, used_uva, avail_uva, 0)
        await self.request(FrontendReq.SET_VRING_ADDR, bytes(addr))

    async def _set_vring_fd(self, request: FrontendReq, index: int, fd: OwnedFd | None) -> None:
        if fd is None:
            await self.request(request, _u64.pack(index | VHOST_USER_VRING_NOFD_MASK))
        else:
            await self.request(request, _u64.pack(index), [fd.fd])

    async def set_vring_kick(self, index: int, fd: OwnedFd | None) -> None:
        await self._set_vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    async def set_vring_call(self, index: int, fd: OwnedFd | None) -> None:
        await self._set_vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    async def set_vring_err(self, index: int, fd: OwnedFd | None) -> None:
        await self._set_vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        await self.request(FrontendReq.SET_VRING_ENABLE, bytes(VringState(index, int(enable))))

    async def get_config(self, offset: int, size: int) -> bytes:
        body = await self.request(FrontendReq.GET_CONFIG,
                                  bytes(ConfigHeader(offset, size, 0)) + bytes(size))
        assert body is not None
        head = ConfigHeader.from_buffer_copy(body)
        if head.size == 0:
            raise FrontendError("back-end refused GET_CONFIG")
        return body[12:12 + head.size]

    async def set_config(self, offset: int, data: bytes) -> None:
        await self.request(FrontendReq.SET_CONFIG, bytes(ConfigHeader(offset, len(data), 0)) + data)

    async def set_status(self, status: int) -> None:
        await self.request(FrontendReq.SET_STATUS, _u64.pack(status))

    async def get_status(self) -> int:
        return await self._u64_reply(FrontendReq.GET_STATUS)

    async def reset_device(self) -> None:
        await self.request(FrontendReq.RESET_DEVICE)


class VhostUserDriver:
    """A virtio driver over a ``VhostUserFrontend``: negotiation, rings, kicks, calls."""

    #: protocol features the driver asks for when the back-end offers them
    WANTED_PROTOCOL = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK)
                       | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
                       | bit(ProtocolFeature.STATUS) | bit(ProtocolFeature.RESET_DEVICE))

    def __init__(self, frontend: VhostUserFrontend, ram: GuestRam) -> None:
        self.frontend = frontend
        self.ram = ram
        self.features = 0
        self.offered = 0
        self.queues: list[DriverQueue] = []
        self.kicks: list[OwnedFd] = []
        self.calls: list[OwnedFd] = []
        self.errs: list[OwnedFd] = []

    async def negotiate(self, want: int | None = None) -> int:
        """Take the features both sides have (``want`` limits them)."""
        fe = self.frontend
        self.offered = await fe.get_features()
        if self.offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered_protocol = await fe.get_protocol_features()
            await fe.set_protocol_features(offered_protocol & self.WANTED_PROTOCOL)
        await fe.set_owner()
        features = self.offered if want is None else self.offered & want
        self.features = features
        await fe.set_features(features)
        return features

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> Feature.RING_EVENT_IDX & 1)

    async def start(self, queue_sizes: Sequence[int], *, share_memory: bool = True) -> None:
        """Share RAM (unless done already), lay out and start the queues the way QEMU does."""
        fe = self.frontend
        if fe.protocol_features >> ProtocolFeature.STATUS & 1:
            await fe.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        if share_memory:
            await fe.set_mem_table([self.ram])
        for index, size in enumerate(queue_sizes):
            q = DriverQueue(self.ram, size, event_idx=self.event_idx)
            self.queues.append(q)
            kick, call, err = _eventfd(), _eventfd(), _eventfd()
            self.kicks.append(kick)
            self.calls.append(call)
            self.errs.append(err)
            await fe.set_vring_num(index, size)
            await fe.set_vring_base(index, 0)
            await fe.set_vring_addr(index, self.ram.gpa_to_uva(q.desc_gpa),
                                    self.ram.gpa_to_uva(q.used_gpa),
                                    self.ram.gpa_to_uva(q.avail_gpa))
            await fe.set_vring_call(index, call)
            await fe.set_vring_err(index, err)
            await fe.set_vring_kick(index, kick)
            if fe.protocol_features:
                await fe.set_vring_enable(index, True)
        if fe.protocol_features >> ProtocolFeature.STATUS & 1:
            await fe.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                                | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)

    async def stop(self) -> list[int]:
        """GET_VRING_BASE on every queue (stops them); the bases."""
        return [await self.frontend.get_vring_base(i) for i in range(len(self.queues))]

    def kick(self, index: int) -> None:
        """Publish the avail index and kick if the device asked for it."""
        if self.queues[index].publish():
            os.write(self.kicks[index].fd, (1).to_bytes(8, "little"))

    def offer(self, index: int, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        return self.queues[index].offer(buffers, indirect=indirect)

    async def wait_used(self, index: int, count: int = 1) -> list[Used]:
        """Wait for interrupts until ``count`` completions have arrived."""
        q = self.queues[index]
        out = q.collect()
        while len(out) < count:
            if q.event_idx:
                # Interrupt me when the device writes the entry I read next, then
                # look again: it may have been written before the request landed.
                q.set_used_event(q.last_used_idx)
                full_fence()
                more = q.collect()
                if more:
                    out += more
                    continue
            call = self.calls[index].fd
            await trio.lowlevel.wait_readable(call)
            try:
                os.read(call, 8)
            except BlockingIOError:
                continue
            out += q.collect()
        return out

    def close(self) -> None:
        close_all(self.kicks + self.calls + self.errs)


@asynccontextmanager
async def open_device(path: str, queue_sizes: Sequence[int], *, ram_size: int = 16 << 20,
                      features: int | None = None) -> AsyncIterator[VhostUserDriver]:
    """Connect to a back-end at ``path``, negotiate and start its queues."""
    ram = GuestRam(ram_size)
    try:
        async with await VhostUserFrontend.connect(path) as fe:
            driver = VhostUserDriver(fe, ram)
            try:
                await driver.negotiate(features)
                await driver.start(queue_sizes)
                yield driver
            finally:
                driver.close()
    finally:
        ram.close()
