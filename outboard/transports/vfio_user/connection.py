"""The vfio-user connection core, without I/O: bytes and fds in, events out.

``receive(data, fds)`` feeds what the socket gave; ``next_event()`` returns the
next complete, validated client ``Request``, a ``Reply`` to a command this
server sent, or ``NEED_DATA``. ``reply``/``error`` turn answers into bytes;
``command`` frames a server-to-client command and remembers its message id so
that its reply can be matched. The core owns the fds it was given until it hands
them to a ``Request`` (whose holder then owns them) or closes them on a fault.

A fault is raised as ``MessageError``: it carries the errno for the client, the
bytes of the error reply (None when the command asked for no reply), and
whether the connection must be dropped.
"""

from __future__ import annotations

import ctypes
import json
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from ...backend.errors import DeviceError, RemoteProtocolError
from ...backend.fd import OwnedFd, close_all
from ..framing import FdBuffer
from .wire import (
    COMMANDS,
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MSG_FDS,
    E2BIG,
    EINVAL,
    ENOSYS,
    ENOTSUP,
    HEADER_SIZE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    MAX_DATA_XFER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_MSG_FDS,
    MAX_VERSION_DATA,
    PAGE_SIZE,
    VFIO_USER_MAJOR,
    VFIO_USER_MINOR,
    Command,
    CommandRule,
    Direction,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    FdRule,
    HeaderFlags,
    IrqSet,
    IrqSetFlags,
    MessageType,
    RegionAccess,
    SingleWrite,
    VersionHeader,
    WriteMultiHeader,
)

__all__ = [
    "NEED_DATA",
    "ClientCapabilities",
    "CommandFailed",
    "MessageError",
    "NeedData",
    "Reply",
    "Request",
    "ServerConnection",
]

log = logging.getLogger("outboard.vfio_user")

_header = struct.Struct("=HHIII")
#: the most DMA windows we accept at once ("max_dma_maps")
MAX_DMA_MAPS = 65535
#: the most writes one REGION_WRITE_MULTI may carry
MAX_WRITE_MULTI = 1024


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class MessageError(RemoteProtocolError):
    """The client sent a message that breaks a rule.

    ``errno`` is what the client is told; ``reply`` the error reply to send
    (None if the command set No_reply or cannot be answered at all).
    """

    def __init__(self, message: str, *, errno: int = EINVAL, fatal: bool = False,
                 reply: bytes | None = None) -> None:
        super().__init__(message, fatal=fatal)
        self.errno = errno
        self.reply = reply


class CommandFailed(DeviceError):
    """A well-formed command the server refuses; the client gets ``errno``."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(eq=False)
class Request:
    """One validated client command. Its fds are owned by whoever holds it."""

    msg_id: int
    command: Command
    flags: int
    payload: bytes
    fds: list[OwnedFd] = field(default_factory=list)
    rule: CommandRule = field(default=COMMANDS[Command.VERSION], repr=False)

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NO_REPLY)

    def fixed(self) -> Any:
        """The fixed part of the payload as its ctypes structure (a copy)."""
        return self.rule.payload.from_buffer_copy(self.payload)

    @property
    def data(self) -> bytes:
        """The bytes after the fixed part."""
        return self.payload[ctypes.sizeof(self.rule.payload):]

    def take_fds(self) -> list[OwnedFd]:
        """Move every fd of this request to the caller."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        close_all(self.fds)
        self.fds.clear()


@dataclass(eq=False)
class Reply:
    """The client's reply to a command this server sent."""

    msg_id: int
    command: Command
    flags: int
    error: int
    payload: bytes

    @property
    def failed(self) -> bool:
        return bool(self.flags & HeaderFlags.ERROR)


@dataclass
class ClientCapabilities:
    """What the client said about itself in VERSION (defaults from the spec)."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = PAGE_SIZE
    max_dma_maps: int = MAX_DMA_MAPS
    write_multiple: bool = False


def pack_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return _header.pack(msg_id & 0xFFFF, command & 0xFFFF, size, flags, error)


class ServerConnection:
    """The server side of one vfio-user connection, as a pure state machine."""

    def __init__(self, *, max_data_xfer_size: int = MAX_DATA_XFER_SIZE,
                 max_msg_fds: int = MAX_MSG_FDS, pgsizes: int = PAGE_SIZE) -> None:
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.pgsizes = pgsizes
        #: the negotiated (major, minor), once VERSION has been answered
        self.version: tuple[int, int] | None = None
        self.client = ClientCapabilities()
        self._in = FdBuffer()
        self._broken = False
        self._pending: dict[int, Command] = {}
        self._next_id = 0

    # -- feeding -----------------------------------------------------------

    def receive(self, data: bytes, fds: Iterable[OwnedFd] = ()) -> None:
        """Take ``data`` and ownership of ``fds`` (they came with ``data``)."""
        fds = list(fds)
        if self._broken:
            close_all(fds)
            return
        if fds and not data:
            close_all(fds)
            raise MessageError("fds arrived without data", fatal=True)
        self._in.feed(data, fds)

    def bytes_needed(self) -> int:
        """How many more bytes complete the current message (at least 1)."""
        have = len(self._in.data)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        size: int = _header.unpack_from(self._in.data)[2]
        return max(1, min(max(size, HEADER_SIZE), MAX_MESSAGE_SIZE + 1) - have)

    def has_pending(self) -> bool:
        """Is part of a message, or an fd, still waiting?"""
        return self._in.pending

    @property
    def pending_commands(self) -> dict[int, Command]:
        """Server-to-client commands still waiting for their reply, by message id."""
        return dict(self._pending)

    # -- events ------------------------------------------------------------

    def next_event(self) -> Request | Reply | NeedData:
        if self._broken:
            raise MessageError("connection already failed", fatal=True)
        buffer = self._in.data
        if len(buffer) < HEADER_SIZE:
            return NEED_DATA
        msg_id, code, size, flags, error = _header.unpack_from(buffer)
        if size < HEADER_SIZE:
            self._fail(f"message size {size} is smaller than the header")
        if size > MAX_MESSAGE_SIZE:
            self._fail(f"message size {size} (limit {MAX_MESSAGE_SIZE})")
        if len(buffer) < size:
            return NEED_DATA
        message, fds = self._in.take(size)
        payload = message[HEADER_SIZE:]
        kind = flags & HeaderFlags.TYPE_MASK
        if kind == MessageType.REPLY:
            return self._reply_event(msg_id, code, flags, error, payload, fds)
        if kind != MessageType.COMMAND:
            close_all(fds)
            raise self._refusal(msg_id, code, flags, EINVAL, f"message type {kind}")
        try:
            command = Command(code)
        except ValueError:
            close_all(fds)
            raise self._refusal(msg_id, code, flags, ENOSYS, f"unknown command {code}") from None
        req = Request(msg_id, command, flags, payload, fds, COMMANDS[command])
        try:
            self._validate(req)
        except MessageError:
            req.close()
            raise
        return req

    def _fail(self, message: str) -> NoReturn:
        self._broken = True
        self.close()  # the fds of the refused message and anything buffered after it
        raise MessageError(message, fatal=True)

    def _refusal(self, msg_id: int, code: int, flags: int, errno: int, message: str,
                 *, fatal: bool = False) -> MessageError:
        name = Command(code).name if code in Command._value2member_map_ else str(code)
        reply = None if flags & HeaderFlags.NO_REPLY else self._error_bytes(msg_id, code, errno)
        if fatal:
            self._broken = True
        return MessageError(f"{name}: {message}", errno=errno, fatal=fatal, reply=reply)

    def _reply_event(self, msg_id: int, code: int, flags: int, error: int, payload: bytes,
                     fds: list[OwnedFd]) -> Reply:
        if fds:
            close_all(fds)
            self._pending.pop(msg_id, None)
            raise MessageError(f"reply {msg_id} carries {len(fds)} fds")
        command = self._pending.get(msg_id)
        if command is None:
            raise MessageError(f"reply {msg_id} to no command of ours")
        if code != command:
            raise MessageError(f"reply {msg_id} names command {code}, not {command.name}")
        del self._pending[msg_id]
        return Reply(msg_id, command, flags, error, payload)

    def _validate(self, req: Request) -> None:
        rule = req.rule
        size = len(req.payload)
        nfds = len(req.fds)

        def bad(message: str, errno: int = EINVAL) -> MessageError:
            return self._refusal(req.msg_id, req.command, req.flags, errno, message)

        if rule.direction is not Direction.CLIENT_TO_SERVER:
            raise bad("sent by the client, but only the server sends it")
        if req.command is Command.VERSION:
            if self.version is not None:
                raise bad("version already negotiated")
        elif self.version is None:
            raise bad("the first command must be VERSION")
        if not rule.implemented:
            raise bad("not supported by this server", ENOTSUP)
        fixed = ctypes.sizeof(rule.payload)
        if size < fixed or (size > fixed and not rule.variable):
            raise bad(f"payload of {size} bytes, expected {'at least ' if rule.variable else ''}"
                      f"{fixed}")
        if nfds > self.max_msg_fds:
            raise bad(f"{nfds} fds (limit {self.max_msg_fds})")
        if rule.fds is FdRule.NONE and nfds:
            raise bad(f"{nfds} unexpected fds")
        if rule.fds is FdRule.OPTIONAL and nfds > 1:
            raise bad(f"{nfds} fds, expected at most 1")
        check = _CHECKS.get(req.command)
        if check is not None:
            problem = check(self, req)
            if problem is not None:
                message, errno = problem if isinstance(problem, tuple) else (problem, EINVAL)
                raise bad(message, errno)

    # -- answers -----------------------------------------------------------

    def _error_bytes(self, msg_id: int, code: int, errno: int) -> bytes:
        flags = MessageType.REPLY | HeaderFlags.ERROR
        return pack_header(msg_id, code, HEADER_SIZE, flags, errno)

    def reply(self, req: Request, payload: bytes = b"") -> bytes | None:
        """The reply to ``req`` (None if it asked for none)."""
        if req.no_reply:
            return None
        return pack_header(req.msg_id, req.command, HEADER_SIZE + len(payload),
                           MessageType.REPLY) + payload

    def error(self, req: Request, errno: int) -> bytes | None:
        """An error reply: "If an error occurs, the reply message must only
        include the reply header" (Header)."""
        if req.no_reply:
            return None
        return self._error_bytes(req.msg_id, req.command, errno)

    def command(self, command: Command, payload: bytes) -> tuple[int, bytes]:
        """Frame a server-to-client command; its reply will come as a ``Reply``.

        Message ids belong to the sender ("Header"): ours count up and skip ids
        still waiting for a reply.
        """
        rule = COMMANDS[command]
        if rule.direction is not Direction.SERVER_TO_CLIENT:
            raise ValueError(f"{command.name} is not a server-to-client command")
        if len(self._pending) > 0xFFFF:
            raise ValueError("every message id is in flight")
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        self._pending[msg_id] = command
        return msg_id, pack_header(msg_id, command, HEADER_SIZE + len(payload),
                                   MessageType.COMMAND) + payload

    def forget(self, msg_id: int) -> None:
        """Stop waiting for the reply to ``msg_id`` (the waiter gave up)."""
        self._pending.pop(msg_id, None)

    def negotiate_version(self, req: Request) -> bytes:
        """The payload of the VERSION reply; the version is settled from here on.

        The client's capabilities were recorded when the command was validated.
        "The minor version in the reply must be equal to or less than the
        minor version proposed" ("Version").
        """
        assert req.command is Command.VERSION
        caps: dict[str, object] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": MAX_DMA_MAPS,
        }
        # The reply's capabilities must be a subset of those proposed: only
        # offer write_multiple to a client that offered it.
        if self.client.write_multiple:
            caps["write_multiple"] = True
        self.version = (VFIO_USER_MAJOR, min(req.fixed().minor, VFIO_USER_MINOR))
        body = json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"
        major, minor = self.version
        return bytes(VersionHeader(major, minor)) + body

    def close(self) -> None:
        """Close every fd still buffered."""
        self._in.close()


# -- rules of single commands ------------------------------------------------------
# Each returns None, a message (EINVAL), or (message, errno).

_Problem = str | tuple[str, int] | None


def _check_version(conn: ServerConnection, req: Request) -> _Problem:
    head = VersionHeader.from_buffer_copy(req.payload)
    if head.major != VFIO_USER_MAJOR:
        # "If the client does not support the proposed major, it closes the
        # connection"; the same goes for us.
        conn._broken = True
        raise MessageError(f"VERSION: major {head.major}, this server speaks "
                           f"{VFIO_USER_MAJOR}", fatal=True, reply=conn.error(req, ENOTSUP),
                           errno=ENOTSUP)
    data = req.data
    client = ClientCapabilities()
    if data:
        problem = _parse_capabilities(data, client)
        if problem is not None:
            conn._broken = True
            raise MessageError(f"VERSION: {problem}", fatal=True, reply=conn.error(req, EINVAL))
    conn.client = client
    return None


def _parse_capabilities(data: bytes, client: ClientCapabilities) -> str | None:
    if len(data) > MAX_VERSION_DATA:
        return f"version data of {len(data)} bytes (limit {MAX_VERSION_DATA})"
    if data[-1] != 0:
        return "version data is not NUL-terminated"
    try:
        doc = json.loads(data[:-1].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        return f"version data is not JSON: {exc}"
    if not isinstance(doc, dict):
        return "version data is not a JSON object"
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        return "capabilities is not an object"
    for name, low in (("max_msg_fds", 0), ("max_data_xfer_size", 1), ("pgsizes", 1),
                      ("max_dma_maps", 1)):
        if name in caps:
            value = caps[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                return f"capability {name} is {value!r}"
            setattr(client, name, value)
    if "write_multiple" in caps:
        if not isinstance(caps["write_multiple"], bool):
            return f"capability write_multiple is {caps['write_multiple']!r}"
        client.write_multiple = caps["write_multiple"]
    return None


def _check_dma_map(conn: ServerConnection, req: Request) -> _Problem:
    m = DmaMap.from_buffer_copy(req.payload)
    if m.argsz < ctypes.sizeof(DmaMap):
        return f"argsz {m.argsz}"
    if m.flags & ~int(DmaMapFlags.READ | DmaMapFlags.WRITE):
        return f"unknown flags {m.flags:#x}"
    if m.size == 0:
        return "size 0"
    if m.address + m.size > 1 << 64:
        return f"{m.address:#x}+{m.size:#x} wraps the address space"
    if (m.address | m.size) % PAGE_SIZE:
        return f"{m.address:#x}+{m.size:#x} is not page aligned"
    if req.fds and m.offset % PAGE_SIZE:
        return f"file offset {m.offset:#x} is not page aligned"
    if not req.fds and m.offset:
        # "offset is ... zero if the region is not mappable"
        return f"file offset {m.offset:#x} without a file"
    return None


def _check_dma_unmap(conn: ServerConnection, req: Request) -> _Problem:
    u = DmaUnmap.from_buffer_copy(req.payload)
    if u.argsz < ctypes.sizeof(DmaUnmap):
        return f"argsz {u.argsz}"
    if u.flags & (DmaUnmapFlags.GET_DIRTY_BITMAP | DmaUnmapFlags.VADDR):
        return f"flags {u.flags:#x} (dirty bitmaps and vaddr updates)", ENOTSUP
    if u.flags & ~int(DmaUnmapFlags.ALL):
        return f"unknown flags {u.flags:#x}"
    if u.flags & DmaUnmapFlags.ALL and (u.address or u.size):
        return "unmap-all with an address or size"
    return None


def _check_argsz(minimum: int) -> Any:
    def check(conn: ServerConnection, req: Request) -> _Problem:
        argsz: int = struct.unpack_from("=I", req.payload)[0]
        if argsz < minimum:
            return f"argsz {argsz} (at least {minimum})"
        return None
    return check


def _check_region_io_fds(conn: ServerConnection, req: Request) -> _Problem:
    problem: _Problem = _check_argsz(16)(conn, req)
    if problem is None and req.fixed().flags:
        problem = f"flags {req.fixed().flags:#x} (must be zero)"
    return problem


def _check_set_irqs(conn: ServerConnection, req: Request) -> _Problem:
    s = IrqSet.from_buffer_copy(req.payload)
    data_kind = s.flags & IRQ_SET_DATA_MASK
    action = s.flags & IRQ_SET_ACTION_MASK
    if s.flags & ~int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
        return f"unknown flags {s.flags:#x}"
    if bin(data_kind).count("1") != 1 or bin(action).count("1") != 1:
        # "The flags are mutually exclusive for both sets."
        return f"flags {s.flags:#x} need exactly one DATA and one ACTION flag"
    if s.argsz < ctypes.sizeof(IrqSet):
        return f"argsz {s.argsz}"
    extra = len(req.data)
    nfds = len(req.fds)
    if s.count == 0 and s.flags != IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER:
        # "a count (and start) of 0, with data flags of DATA_NONE disables all
        # interrupts of the index"; any other zero count is meaningless.
        return "count 0 is only allowed with DATA_NONE | ACTION_TRIGGER"
    if s.count == 0 and s.start:
        return f"count 0 with start {s.start}"
    if data_kind == IrqSetFlags.DATA_BOOL:
        if extra != s.count:
            return f"{extra} bytes of booleans for count {s.count}"
    elif extra:
        return f"{extra} unexpected bytes after the irq set"
    if data_kind == IrqSetFlags.DATA_EVENTFD:
        # "If no file descriptors are provided, this de-assigns"
        if nfds not in (0, s.count):
            return f"{nfds} fds for count {s.count}"
    elif nfds:
        return f"{nfds} fds without DATA_EVENTFD"
    return None


def _check_region_read(conn: ServerConnection, req: Request) -> _Problem:
    a = RegionAccess.from_buffer_copy(req.payload)
    if a.count == 0:
        return "count 0"
    if a.count > conn.max_data_xfer_size:
        return f"count {a.count} (max_data_xfer_size {conn.max_data_xfer_size})", E2BIG
    return None


def _check_region_write(conn: ServerConnection, req: Request) -> _Problem:
    problem = _check_region_read(conn, req)
    if problem is not None:
        return problem
    a = RegionAccess.from_buffer_copy(req.payload)
    if len(req.data) != a.count:
        return f"{len(req.data)} bytes of data for count {a.count}"
    return None


def _check_write_multi(conn: ServerConnection, req: Request) -> _Problem:
    if not conn.client.write_multiple:
        return "write_multiple was not negotiated"
    count = WriteMultiHeader.from_buffer_copy(req.payload).wr_cnt
    step = ctypes.sizeof(SingleWrite)
    if not 0 < count <= MAX_WRITE_MULTI:
        return f"wr_cnt {count} (1 to {MAX_WRITE_MULTI})"
    if len(req.data) != count * step:
        return f"{len(req.data)} bytes for {count} writes"
    for i in range(count):
        one = SingleWrite.from_buffer_copy(req.data, i * step)
        if not 0 < one.count <= 8:
            return f"write {i} has count {one.count} (1 to 8)"
    return None


_CHECKS: dict[Command, Any] = {
    Command.VERSION: _check_version,
    Command.DMA_MAP: _check_dma_map,
    Command.DMA_UNMAP: _check_dma_unmap,
    Command.DEVICE_GET_INFO: _check_argsz(16),
    Command.DEVICE_GET_REGION_INFO: _check_argsz(32),
    Command.DEVICE_GET_REGION_IO_FDS: _check_region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: _check_argsz(16),
    Command.DEVICE_SET_IRQS: _check_set_irqs,
    Command.REGION_READ: _check_region_read,
    Command.REGION_WRITE: _check_region_write,
    Command.REGION_WRITE_MULTI: _check_write_multi,
}


def writes_of(req: Request) -> Sequence[tuple[int, int, bytes]]:
    """REGION_WRITE_MULTI's writes as (region, offset, data)."""
    count = WriteMultiHeader.from_buffer_copy(req.payload).wr_cnt
    step = ctypes.sizeof(SingleWrite)
    out = []
    for i in range(count):
        one = SingleWrite.from_buffer_copy(req.data, i * step)
        out.append((one.region, one.offset, bytes(one.data)[:one.count]))
    return out
