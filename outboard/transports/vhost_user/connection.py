"""The vhost-user connection core, without I/O: bytes and fds in, requests out.

``receive(data, fds)`` feeds what the socket gave; ``next_event()`` returns the
next complete, validated ``Request`` or ``NEED_DATA``; ``reply``/``ack`` turn
answers into bytes. The core owns the fds it was given until it hands them to
a ``Request`` (whose owner then closes them) or closes them itself on error.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NoReturn

from ...backend.errors import RemoteProtocolError
from ...backend.fd import OwnedFd, close_all
from ..framing import FdBuffer
from .wire import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    PAYLOAD_SIZES,
    REQUESTS,
    SUPPORTED_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    ConfigHeader,
    FdRule,
    Flags,
    FrontendReq,
    MemoryRegionDescription,
    MemoryTableHeader,
    Payload,
    ProtocolFeature,
    RequestRule,
    SingleMemoryRegion,
    VringAddress,
    VringState,
)

__all__ = ["NEED_DATA", "BackendConnection", "NeedData", "Request"]

_header = struct.Struct("=III")
_u64 = struct.Struct("=Q")


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(eq=False)
class Request:
    """One validated front-end request. Its fds are owned by whoever holds it."""

    request: FrontendReq
    flags: int
    payload: bytes
    fds: list[OwnedFd] = field(default_factory=list)
    rule: RequestRule = field(default=REQUESTS[FrontendReq.GET_FEATURES], repr=False)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & Flags.NEED_REPLY)

    @property
    def u64(self) -> int:
        value: int = _u64.unpack_from(self.payload)[0]
        return value

    @property
    def state(self) -> VringState:
        return VringState.from_buffer_copy(self.payload)

    @property
    def address(self) -> VringAddress:
        return VringAddress.from_buffer_copy(self.payload)

    @property
    def vring_index(self) -> int:
        """For SET_VRING_KICK/CALL/ERR: the queue index in bits 0-7."""
        return self.u64 & VHOST_USER_VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VHOST_USER_VRING_NOFD_MASK)

    @property
    def regions(self) -> list[MemoryRegionDescription]:
        if self.request is FrontendReq.SET_MEM_TABLE:
            count = MemoryTableHeader.from_buffer_copy(self.payload).nregions
            base = ctypes.sizeof(MemoryTableHeader)
            step = ctypes.sizeof(MemoryRegionDescription)
            return [MemoryRegionDescription.from_buffer_copy(self.payload, base + i * step)
                    for i in range(count)]
        return [SingleMemoryRegion.from_buffer_copy(self.payload).region]

    @property
    def config(self) -> tuple[ConfigHeader, bytes]:
        head = ConfigHeader.from_buffer_copy(self.payload)
        return head, self.payload[ctypes.sizeof(ConfigHeader):]

    def take_fd(self) -> OwnedFd | None:
        """Move this request's single fd (if any) to the caller."""
        return self.fds.pop(0) if self.fds else None

    def close(self) -> None:
        close_all(self.fds)
        self.fds.clear()


class BackendConnection:
    """The back-end side of one vhost-user connection, as a pure state machine."""

    def __init__(self, protocol_features: int = SUPPORTED_PROTOCOL_FEATURES) -> None:
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self._in = FdBuffer()
        self._broken = False

    # -- feeding -----------------------------------------------------------

    def receive(self, data: bytes, fds: Iterable[OwnedFd] = ()) -> None:
        """Take ``data`` and ownership of ``fds`` (they came with ``data``)."""
        fds = list(fds)
        if self._broken:
            close_all(fds)
            return
        if fds and not data:
            close_all(fds)
            self._fail("fds arrived without data")
        self._in.feed(data, fds)

    def bytes_needed(self) -> int:
        """How many more bytes complete the current message (at least 1)."""
        have = len(self._in.data)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        size: int = _header.unpack_from(self._in.data)[2]
        return max(1, HEADER_SIZE + min(size, MAX_PAYLOAD + 1) - have)

    def has_pending(self) -> bool:
        """Is part of a message, or an fd, still waiting?"""
        return self._in.pending

    # -- events ------------------------------------------------------------

    def next_event(self) -> Request | NeedData:
        if self._broken:
            raise RemoteProtocolError("connection already failed")
        buffer = self._in.data
        if len(buffer) < HEADER_SIZE:
            return NEED_DATA
        code, flags, size = _header.unpack_from(buffer)
        if flags & Flags.VERSION_MASK != VHOST_USER_VERSION:
            self._fail(f"bad protocol version {flags & Flags.VERSION_MASK} (flags {flags:#x})")
        if flags & Flags.REPLY:
            self._fail(f"request {code} carries the reply flag")
        if size > MAX_PAYLOAD:
            self._fail(f"payload of {size} bytes for request {code} (limit {MAX_PAYLOAD})")
        end = HEADER_SIZE + size
        if len(buffer) < end:
            return NEED_DATA
        message, fds = self._in.take(end)
        payload = message[HEADER_SIZE:]
        try:
            request = FrontendReq(code)
        except ValueError:
            close_all(fds)
            self._fail(f"unknown request {code}")
        rule = REQUESTS[request]
        req = Request(request, flags, payload, fds, rule)
        try:
            self._validate(req)
        except RemoteProtocolError as exc:
            req.close()
            if exc.fatal:
                self._broken = True
            else:
                exc.request = req
            raise
        if request is FrontendReq.SET_PROTOCOL_FEATURES:
            self.protocol_features = req.u64
        return req

    def _fail(self, message: str) -> NoReturn:
        self._broken = True
        self.close()  # the fds of the refused message and anything buffered after it
        raise RemoteProtocolError(message)

    def _validate(self, req: Request) -> None:
        rule = req.rule
        name = req.request.name
        size = len(req.payload)
        nfds = len(req.fds)

        def bad(message: str, fatal: bool = True) -> RemoteProtocolError:
            return RemoteProtocolError(f"{name}: {message}", fatal=fatal)

        # Payload size.
        if rule.payload is Payload.MEM_TABLE:
            if size < ctypes.sizeof(MemoryTableHeader):
                raise bad(f"payload of {size} bytes is too short")
            count = MemoryTableHeader.from_buffer_copy(req.payload).nregions
            if count > MAX_MEM_REGIONS:
                raise bad(f"{count} regions (limit {MAX_MEM_REGIONS})")
            want = ctypes.sizeof(MemoryTableHeader) + count * ctypes.sizeof(
                MemoryRegionDescription)
            # QEMU sends the table with room for all 8 regions; accept either.
            full = ctypes.sizeof(MemoryTableHeader) + MAX_MEM_REGIONS * ctypes.sizeof(
                MemoryRegionDescription)
            if size not in (want, full):
                raise bad(f"payload of {size} bytes for {count} regions")
        elif rule.payload is Payload.CONFIG:
            if size < ctypes.sizeof(ConfigHeader):
                raise bad(f"payload of {size} bytes is too short")
            head = ConfigHeader.from_buffer_copy(req.payload)
            if head.size > MAX_CONFIG_SIZE or size != ctypes.sizeof(ConfigHeader) + head.size:
                raise bad(f"config size field {head.size} with a payload of {size} bytes")
        elif rule.payload is not Payload.ANY:
            want = PAYLOAD_SIZES[rule.payload]
            if size != want:
                raise bad(f"payload of {size} bytes, expected {want}")

        # File descriptors.
        if nfds > MAX_FDS:
            raise bad(f"{nfds} fds (limit {MAX_FDS})")
        match rule.fds:
            case FdRule.NONE:
                if nfds:
                    raise bad(f"{nfds} unexpected fds")
            case FdRule.ONE:
                if nfds != 1:
                    raise bad(f"{nfds} fds, expected 1")
            case FdRule.OPTIONAL:
                want_fds = 0 if req.nofd else 1
                if nfds != want_fds:
                    raise bad(f"{nfds} fds with the no-fd flag {'set' if req.nofd else 'clear'}")
                if req.u64 & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
                    raise bad(f"reserved bits set in {req.u64:#x}")
            case FdRule.PER_REGION:
                count = len(req.regions)
                if nfds != count:
                    raise bad(f"{nfds} fds for {count} regions")
            case FdRule.IGNORED:
                if nfds > 1:
                    raise bad(f"{nfds} fds, expected none")
                req.close()  # the spec: close it without using it

        # Protocol features.
        if rule.needs is not None and not self.protocol_features >> rule.needs & 1:
            raise bad(f"needs protocol feature {rule.needs.name}, not negotiated", fatal=False)
        if req.request is FrontendReq.SET_PROTOCOL_FEATURES:
            extra = req.u64 & ~self.offered_protocol_features
            if extra:
                raise bad(f"protocol feature bits never offered: {extra:#x}", fatal=False)

    # -- answers -----------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features >> ProtocolFeature.REPLY_ACK & 1)

    def reply(self, req: Request, payload: bytes) -> bytes:
        flags = VHOST_USER_VERSION | Flags.REPLY
        return _header.pack(req.request, flags, len(payload)) + payload

    def ack(self, req: Request, ok: bool) -> bytes | None:
        """The REPLY_ACK answer for a request without a reply of its own, if wanted."""
        if req.rule.replies or not (req.need_reply and self.reply_ack):
            return None
        return self.reply(req, _u64.pack(0 if ok else 1))

    def close(self) -> None:
        """Close every fd still buffered."""
        self._in.close()


def pack_u64(value: int) -> bytes:
    return _u64.pack(value)


def pack_state(index: int, num: int) -> bytes:
    return bytes(VringState(index, num))
