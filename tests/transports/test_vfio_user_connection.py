"""The vfio-user connection core: a byte fixture for every command, one test per rule.

Every row of ``COMMANDS`` that a client may send gets a well-formed message with
real fds (memfds, eventfds), fed whole, one byte at a time and split between
header and body. Each validation rule then gets a message that breaks it: the
core answers with the rule's errno (unless the command asked for no reply),
closes the fds that came with the message, and either goes on or, for a fault
that leaves the stream unframed, refuses everything after.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
from collections.abc import Iterable

import pytest

from outboard.backend.fd import OwnedFd
from outboard.transports.vfio_user.connection import (
    NEED_DATA,
    MessageError,
    Reply,
    Request,
    ServerConnection,
    writes_of,
)
from outboard.transports.vfio_user.wire import (
    COMMANDS,
    HEADER_SIZE,
    MAX_DATA_XFER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_MSG_FDS,
    Command,
    CommandRule,
    DeviceFeature,
    DeviceInfo,
    Direction,
    DmaAccess,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    FdRule,
    HeaderFlags,
    IrqInfo,
    IrqSet,
    IrqSetFlags,
    MigDataAccess,
    RegionAccess,
    RegionInfo,
    RegionIoFds,
    SingleWrite,
    VersionHeader,
    WriteMultiHeader,
)

pytestmark = pytest.mark.usefixtures("fd_leak_check")

PAGE = 4096
NO_REPLY = HeaderFlags.NO_REPLY
REPLY = 1
ERROR = HeaderFlags.ERROR
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER


def message(command: int, payload: bytes = b"", *, msg_id: int = 7, flags: int = 0,
            size: int | None = None, error: int = 0) -> bytes:
    """A client message: header (id, command, size, flags, error) and payload."""
    total = HEADER_SIZE + len(payload) if size is None else size
    return struct.pack("=HHIII", msg_id, command, total, flags, error) + payload


def version_payload(caps: object = None, *, major: int = 0, minor: int = 0,
                    raw: bytes | None = None) -> bytes:
    if raw is None:
        raw = b"" if caps is None else json.dumps(caps).encode() + b"\0"
    return bytes(VersionHeader(major, minor)) + raw


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def memfd(size: int = PAGE) -> OwnedFd:
    fd = OwnedFd(os.memfd_create("outboard-test", os.MFD_CLOEXEC))
    os.ftruncate(fd.fd, size)
    return fd


def write_multi(*writes: tuple[int, int, bytes]) -> bytes:
    body = b""
    for region, offset, data in writes:
        one = SingleWrite(offset, region, len(data))
        ctypes.memmove(one.data, data, len(data))
        body += bytes(one)
    return bytes(WriteMultiHeader(len(writes))) + body


#: a well-formed payload of every command a client sends
PAYLOADS: dict[Command, bytes] = {
    Command.VERSION: version_payload({"capabilities": {"max_msg_fds": 8}}),
    Command.DMA_MAP: bytes(DmaMap(32, DmaMapFlags.READ | DmaMapFlags.WRITE, 0, 0x10000, PAGE)),
    Command.DMA_UNMAP: bytes(DmaUnmap(24, 0, 0x10000, PAGE)),
    Command.DEVICE_GET_INFO: bytes(DeviceInfo(16, 0, 0, 0)),
    Command.DEVICE_GET_REGION_INFO: bytes(RegionInfo(32, 0, 4, 0, 0, 0)),
    Command.DEVICE_GET_REGION_IO_FDS: bytes(RegionIoFds(256, 0, 4, 0)),
    Command.DEVICE_GET_IRQ_INFO: bytes(IrqInfo(16, 0, 2, 0)),
    Command.DEVICE_SET_IRQS: bytes(IrqSet(20, TRIGGER_EVENTFD, 2, 0, 2)),
    Command.REGION_READ: bytes(RegionAccess(0, 7, 4)),
    Command.REGION_WRITE: bytes(RegionAccess(4, 7, 2)) + b"\x06\x00",
    Command.DMA_READ: bytes(DmaAccess(0x10000, 8)),
    Command.DMA_WRITE: bytes(DmaAccess(0x10000, 2)) + b"hi",
    Command.DEVICE_RESET: b"",
    Command.REGION_WRITE_MULTI: write_multi((4, 0x3000, b"\0\0"), (4, 0x3004, b"\1\0")),
    Command.DEVICE_FEATURE: bytes(DeviceFeature(8, 1 << 16 | 1)),
    Command.MIG_DATA_READ: bytes(MigDataAccess(8, 4096)),
    Command.MIG_DATA_WRITE: bytes(MigDataAccess(8, 2)) + b"ab",
}


def fds_for(command: Command) -> list[OwnedFd]:
    """The fds a well-formed message of this row carries."""
    if command is Command.DMA_MAP:
        return [memfd()]
    if command is Command.DEVICE_SET_IRQS:
        return [eventfd(), eventfd()]
    return []


def rows(condition: object = None) -> list[object]:
    """``COMMANDS`` as pytest parameters, optionally only where ``condition(rule)``."""
    return [pytest.param(command, rule, id=command.name) for command, rule in COMMANDS.items()
            if condition is None or condition(rule)]  # type: ignore[operator]


def client_rows(implemented: bool = True) -> list[object]:
    return rows(lambda rule: rule.direction is Direction.CLIENT_TO_SERVER
                and rule.implemented is implemented)


def negotiated(caps: object = None) -> ServerConnection:
    """A connection past VERSION (the client offered ``caps``; write_multiple by default)."""
    conn = ServerConnection()
    payload = version_payload({"capabilities": {"write_multiple": True}} if caps is None
                              else caps)
    conn.receive(message(Command.VERSION, payload, msg_id=0))
    req = conn.next_event()
    assert isinstance(req, Request)
    conn.negotiate_version(req)
    return conn


def connection_for(command: Command) -> ServerConnection:
    return ServerConnection() if command is Command.VERSION else negotiated()


def pieces(data: bytes, split: str) -> list[bytes]:
    if split == "whole":
        return [data]
    if split == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    assert split == "header-body"
    return [data[:HEADER_SIZE], data[HEADER_SIZE:]] if len(data) > HEADER_SIZE else [data]


def deliver(conn: ServerConnection, data: bytes, fds: Iterable[OwnedFd], split: str
            ) -> Request | Reply:
    """Feed one message in pieces (the fds with the first), checking that the core
    wants more until the last piece and that ``bytes_needed`` never asks for more
    than the message has left (and for exactly that once the header is in)."""
    fed = 0
    for number, piece in enumerate(pieces(data, split)):
        assert conn.next_event() is NEED_DATA
        needed = conn.bytes_needed()
        if fed < HEADER_SIZE:
            assert needed == HEADER_SIZE - fed
        else:
            assert needed == len(data) - fed
        conn.receive(piece, fds if number == 0 else ())
        fed += len(piece)
    event = conn.next_event()
    assert isinstance(event, Request | Reply)
    return event


def refused(conn: ServerConnection, data: bytes, fds: Iterable[OwnedFd] = ()) -> MessageError:
    conn.receive(data, fds)
    with pytest.raises(MessageError) as info:
        conn.next_event()
    return info.value


def error_of(reply: bytes | None) -> tuple[int, int, int, int]:
    """(msg_id, command, flags, errno) of an error reply, which is a bare header."""
    assert reply is not None
    assert len(reply) == HEADER_SIZE
    msg_id, command, size, flags, error = struct.unpack("=HHIII", reply)
    assert size == HEADER_SIZE
    return msg_id, command, flags, error


def assert_refused_with(exc: MessageError, errno_: int, command: int, msg_id: int = 7) -> None:
    assert exc.errno == errno_
    assert not exc.fatal
    assert error_of(exc.reply) == (msg_id, command, REPLY | ERROR, errno_)


def assert_connection_goes_on(conn: ServerConnection) -> None:
    conn.receive(message(Command.DEVICE_GET_INFO, PAYLOADS[Command.DEVICE_GET_INFO]))
    event = conn.next_event()
    assert isinstance(event, Request)
    assert event.command is Command.DEVICE_GET_INFO
    assert conn.next_event() is NEED_DATA
    assert not conn.has_pending()


def assert_connection_failed(conn: ServerConnection) -> None:
    """After a fatal fault the core hands out nothing more, not even a good message."""
    conn.receive(message(Command.DEVICE_GET_INFO, PAYLOADS[Command.DEVICE_GET_INFO]))
    with pytest.raises(MessageError) as info:
        conn.next_event()
    assert info.value.fatal
    conn.close()


# -- the table and its fixtures ------------------------------------------------


def test_every_command_has_a_row_and_a_payload_fixture() -> None:
    assert set(COMMANDS) == set(Command)
    assert set(PAYLOADS) == set(Command)


@pytest.mark.parametrize(("command", "rule"), rows())
def test_payload_fixture_fits_its_row(command: Command, rule: CommandRule) -> None:
    fixed = ctypes.sizeof(rule.payload)
    assert len(PAYLOADS[command]) >= fixed
    assert rule.variable or len(PAYLOADS[command]) == fixed


def test_spec_command_numbers() -> None:
    """The "Commands" table of the spec, number for number."""
    assert [(c.name, c.value) for c in Command] == [
        ("VERSION", 1), ("DMA_MAP", 2), ("DMA_UNMAP", 3), ("DEVICE_GET_INFO", 4),
        ("DEVICE_GET_REGION_INFO", 5), ("DEVICE_GET_REGION_IO_FDS", 6),
        ("DEVICE_GET_IRQ_INFO", 7), ("DEVICE_SET_IRQS", 8), ("REGION_READ", 9),
        ("REGION_WRITE", 10), ("DMA_READ", 11), ("DMA_WRITE", 12), ("DEVICE_RESET", 13),
        ("REGION_WRITE_MULTI", 15), ("DEVICE_FEATURE", 16), ("MIG_DATA_READ", 17),
        ("MIG_DATA_WRITE", 18)]


# -- well-formed messages, every row -------------------------------------------------


@pytest.mark.parametrize("split", ["whole", "bytewise", "header-body"])
@pytest.mark.parametrize("flags", [0, NO_REPLY], ids=["reply", "no-reply"])
@pytest.mark.parametrize(("command", "rule"), client_rows())
def test_well_formed_command_comes_out_whole(command: Command, rule: CommandRule,
                                             flags: int, split: str) -> None:
    conn = connection_for(command)
    payload = PAYLOADS[command]
    fds = fds_for(command)
    req = deliver(conn, message(command, payload, msg_id=0xBEEF, flags=flags), fds, split)
    assert isinstance(req, Request)
    try:
        assert req.command is command
        assert req.msg_id == 0xBEEF
        assert req.no_reply == bool(flags & NO_REPLY)
        assert req.payload == payload
        assert req.rule is rule
        assert req.fds == fds  # the very fds that were sent, now the request's
        assert all(not fd.closed for fd in fds)
        assert conn.next_event() is NEED_DATA
        assert not conn.has_pending()
        assert conn.bytes_needed() == HEADER_SIZE
    finally:
        req.close()
    assert all(fd.closed for fd in fds)
    conn.close()


@pytest.mark.parametrize(("command", "rule"), client_rows())
def test_reply_echoes_the_message_id_and_command(command: Command, rule: CommandRule) -> None:
    conn = connection_for(command)
    conn.receive(message(command, PAYLOADS[command], msg_id=0x1234), fds_for(command))
    req = conn.next_event()
    assert isinstance(req, Request)
    req.close()
    reply = conn.reply(req, b"abc")
    assert reply == struct.pack("=HHIII", 0x1234, command, HEADER_SIZE + 3, REPLY, 0) + b"abc"
    assert error_of(conn.error(req, errno.EIO)) == (0x1234, command, REPLY | ERROR, errno.EIO)


def test_no_reply_commands_get_no_reply_not_even_an_error() -> None:
    conn = negotiated()
    conn.receive(message(Command.REGION_WRITE, PAYLOADS[Command.REGION_WRITE], flags=NO_REPLY))
    req = conn.next_event()
    assert isinstance(req, Request)
    assert conn.reply(req) is None
    assert conn.error(req, errno.EINVAL) is None


def test_messages_back_to_back_in_one_chunk() -> None:
    conn = negotiated()
    conn.receive(b"".join(message(Command.REGION_READ, PAYLOADS[Command.REGION_READ],
                                  msg_id=i) for i in range(3)))
    ids = []
    for _ in range(3):
        req = conn.next_event()
        assert isinstance(req, Request)
        ids.append(req.msg_id)
    assert ids == [0, 1, 2]
    assert conn.next_event() is NEED_DATA


def test_fds_go_to_the_message_they_came_with() -> None:
    conn = negotiated()
    first, second = memfd(), memfd()
    conn.receive(message(Command.DMA_MAP, PAYLOADS[Command.DMA_MAP]), [first])
    conn.receive(message(Command.DEVICE_RESET))
    conn.receive(message(Command.DMA_MAP, PAYLOADS[Command.DMA_MAP]), [second])
    events = [conn.next_event() for _ in range(3)]
    assert [e.fds for e in events if isinstance(e, Request)] == [[first], [], [second]]
    for e in events:
        assert isinstance(e, Request)
        e.close()


def test_dma_map_without_an_fd_is_well_formed() -> None:
    conn = negotiated()
    payload = bytes(DmaMap(32, DmaMapFlags.READ, 0, 0xC0000, 2 * PAGE))
    req = deliver(conn, message(Command.DMA_MAP, payload), [], "whole")
    assert isinstance(req, Request)
    assert req.fds == []


def test_set_irqs_with_eventfd_and_no_fds_deassigns() -> None:
    """"If no file descriptors are provided, this de-assigns" (SET_IRQS)."""
    conn = negotiated()
    req = deliver(conn, message(Command.DEVICE_SET_IRQS, PAYLOADS[Command.DEVICE_SET_IRQS]),
                  [], "whole")
    assert isinstance(req, Request)
    assert req.fds == []


def test_set_irqs_disable_all_is_well_formed() -> None:
    conn = negotiated()
    payload = bytes(IrqSet(20, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0, 0))
    assert isinstance(deliver(conn, message(Command.DEVICE_SET_IRQS, payload), [], "whole"),
                      Request)


def test_set_irqs_bool_data() -> None:
    conn = negotiated()
    payload = bytes(IrqSet(23, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 2, 0, 3)) \
        + b"\1\0\1"
    req = deliver(conn, message(Command.DEVICE_SET_IRQS, payload), [], "bytewise")
    assert isinstance(req, Request)
    assert req.data == b"\1\0\1"


def test_write_multi_writes() -> None:
    conn = negotiated()
    req = deliver(conn, message(Command.REGION_WRITE_MULTI,
                                PAYLOADS[Command.REGION_WRITE_MULTI]), [], "header-body")
    assert isinstance(req, Request)
    assert list(writes_of(req)) == [(4, 0x3000, b"\0\0"), (4, 0x3004, b"\1\0")]


# -- VERSION ---------------------------------------------------------------------------


def negotiate(caps: object, **kw: int) -> tuple[ServerConnection, bytes]:
    conn = ServerConnection()
    conn.receive(message(Command.VERSION, version_payload(caps, **kw)))
    req = conn.next_event()
    assert isinstance(req, Request)
    return conn, conn.negotiate_version(req)


def reply_caps(payload: bytes) -> tuple[int, int, dict[str, object]]:
    head = VersionHeader.from_buffer_copy(payload)
    data = payload[4:]
    assert data.endswith(b"\0") and b"\0" not in data[:-1]  # NUL-terminated JSON
    doc = json.loads(data[:-1])
    return head.major, head.minor, doc["capabilities"]


def test_version_reply_is_nul_terminated_json_with_our_capabilities() -> None:
    conn, payload = negotiate({"capabilities": {"max_msg_fds": 8, "pgsizes": 4096}})
    major, minor, caps = reply_caps(payload)
    assert (major, minor) == (0, 0)
    assert caps["max_msg_fds"] == MAX_MSG_FDS
    assert caps["max_data_xfer_size"] == MAX_DATA_XFER_SIZE
    assert caps["pgsizes"] == PAGE
    assert "migration" not in caps
    assert conn.version == (0, 0)
    assert conn.client.max_msg_fds == 8


def test_version_accepts_a_higher_minor_and_answers_ours() -> None:
    """"The minor version in the reply must be equal to or less than the minor
    version proposed"."""
    _conn, payload = negotiate({}, minor=5)
    assert reply_caps(payload)[:2] == (0, 0)


def test_version_without_data_takes_the_spec_defaults() -> None:
    conn, payload = negotiate(None)
    assert conn.client.max_msg_fds == 1
    assert conn.client.max_data_xfer_size == 1 << 20
    assert "write_multiple" not in reply_caps(payload)[2]


def test_version_as_qemu_sends_it() -> None:
    """QEMU proposes migration and write_multiple too; the reply stays a subset."""
    qemu = {"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 1 << 28},
                             "max_msg_fds": 16, "max_data_xfer_size": 1 << 20,
                             "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": True}}
    _conn, payload = negotiate(qemu)
    caps = reply_caps(payload)[2]
    assert caps["write_multiple"] is True
    assert set(caps) <= set(qemu["capabilities"])  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"capabilities": {}}', id="no-nul"),
    pytest.param(b'{"capabilities": \0', id="not-json"),
    pytest.param(b"[1, 2]\0", id="not-an-object"),
    pytest.param(b'{"capabilities": 3}\0', id="capabilities-not-an-object"),
    pytest.param(b'{"capabilities": {"max_msg_fds": "8"}}\0', id="max-msg-fds-a-string"),
    pytest.param(b'{"capabilities": {"max_msg_fds": -1}}\0', id="max-msg-fds-negative"),
    pytest.param(b'{"capabilities": {"max_data_xfer_size": 0}}\0', id="xfer-size-zero"),
    pytest.param(b'{"capabilities": {"pgsizes": true}}\0', id="pgsizes-a-bool"),
    pytest.param(b'{"capabilities": {"write_multiple": 1}}\0', id="write-multiple-a-number"),
    pytest.param(b"\xff\0", id="not-utf-8"),
])
def test_version_with_bad_data_is_answered_and_ends_the_connection(raw: bytes) -> None:
    conn = ServerConnection()
    exc = refused(conn, message(Command.VERSION, version_payload(raw=raw)))
    assert exc.fatal
    assert error_of(exc.reply)[3] == errno.EINVAL
    assert_connection_failed(conn)


def test_version_with_another_major_ends_the_connection() -> None:
    """"The major version in the reply must be the same as proposed" — we have one."""
    conn = ServerConnection()
    exc = refused(conn, message(Command.VERSION, version_payload({}, major=1)))
    assert exc.fatal
    assert error_of(exc.reply)[3] == errno.EOPNOTSUPP
    assert_connection_failed(conn)


def test_version_data_has_a_size_limit() -> None:
    conn = ServerConnection()
    raw = json.dumps({"capabilities": {}, "pad": "x" * 5000}).encode() + b"\0"
    assert refused(conn, message(Command.VERSION, version_payload(raw=raw))).fatal


def test_command_before_version_is_refused_and_the_connection_goes_on() -> None:
    conn = ServerConnection()
    exc = refused(conn, message(Command.DEVICE_GET_INFO, PAYLOADS[Command.DEVICE_GET_INFO]))
    assert_refused_with(exc, errno.EINVAL, Command.DEVICE_GET_INFO)
    conn.receive(message(Command.VERSION, version_payload({})))
    req = conn.next_event()
    assert isinstance(req, Request)
    conn.negotiate_version(req)
    assert_connection_goes_on(conn)


def test_second_version_is_refused() -> None:
    conn = negotiated()
    exc = refused(conn, message(Command.VERSION, version_payload({})))
    assert_refused_with(exc, errno.EINVAL, Command.VERSION)
    assert_connection_goes_on(conn)


# -- framing faults ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE - 1])
def test_message_size_smaller_than_the_header_is_fatal(size: int) -> None:
    conn = negotiated()
    fd = eventfd()
    exc = refused(conn, message(Command.DEVICE_RESET, size=size), [fd])
    assert exc.fatal
    assert exc.reply is None
    assert_connection_failed(conn)
    assert fd.closed


def test_oversized_message_is_fatal_before_its_body_arrives() -> None:
    conn = negotiated()
    conn.receive(message(Command.REGION_WRITE, size=MAX_MESSAGE_SIZE + 1))
    assert conn.bytes_needed() <= MAX_MESSAGE_SIZE + 1 - HEADER_SIZE + 1
    with pytest.raises(MessageError) as info:
        conn.next_event()
    assert info.value.fatal
    assert_connection_failed(conn)


def test_bytes_needed_is_capped_for_a_huge_size_field() -> None:
    conn = negotiated()
    conn.receive(message(Command.REGION_WRITE, size=0xFFFF_FFFF))
    assert conn.bytes_needed() == MAX_MESSAGE_SIZE + 1 - HEADER_SIZE


def test_fds_without_data_are_fatal_and_closed() -> None:
    conn = negotiated()
    fd = eventfd()
    with pytest.raises(MessageError) as info:
        conn.receive(b"", [fd])
    assert info.value.fatal
    assert fd.closed


def test_close_closes_fds_of_a_partial_message() -> None:
    conn = negotiated()
    fd = memfd()
    data = message(Command.DMA_MAP, PAYLOADS[Command.DMA_MAP])
    conn.receive(data[:20], [fd])
    assert conn.next_event() is NEED_DATA
    assert conn.has_pending()
    conn.close()
    assert fd.closed


def test_unknown_command_is_refused_with_enosys() -> None:
    conn = negotiated()
    fd = eventfd()
    exc = refused(conn, message(14, b"dirty pages"), [fd])
    assert_refused_with(exc, errno.ENOSYS, 14)
    assert fd.closed
    assert_connection_goes_on(conn)


@pytest.mark.parametrize("kind", [2, 0xF])
def test_unknown_message_type_is_refused(kind: int) -> None:
    conn = negotiated()
    exc = refused(conn, message(Command.DEVICE_RESET, flags=kind))
    assert_refused_with(exc, errno.EINVAL, Command.DEVICE_RESET)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("command", "rule"),
                         rows(lambda rule: rule.direction is Direction.SERVER_TO_CLIENT))
def test_server_to_client_command_from_the_client_is_refused(command: Command,
                                                             rule: CommandRule) -> None:
    conn = negotiated()
    exc = refused(conn, message(command, PAYLOADS[command]))
    assert_refused_with(exc, errno.EINVAL, command)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("command", "rule"), client_rows(implemented=False))
def test_unimplemented_command_is_refused_with_enotsup(command: Command,
                                                       rule: CommandRule) -> None:
    conn = negotiated()
    exc = refused(conn, message(command, PAYLOADS[command]))
    assert_refused_with(exc, errno.EOPNOTSUPP, command)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("command", "rule"), rows(
    lambda rule: rule.direction is Direction.CLIENT_TO_SERVER and rule.implemented
    and ctypes.sizeof(rule.payload) > 0))
def test_short_payload_is_refused(command: Command, rule: CommandRule) -> None:
    fixed = ctypes.sizeof(rule.payload)
    conn = connection_for(command)
    fds = fds_for(command)
    exc = refused(conn, message(command, PAYLOADS[command][:fixed - 1]), fds)
    assert_refused_with(exc, errno.EINVAL, command)
    assert all(fd.closed for fd in fds)


@pytest.mark.parametrize(("command", "rule"),
                         rows(lambda rule: rule.direction is Direction.CLIENT_TO_SERVER
                              and rule.implemented and not rule.variable))
def test_long_payload_of_a_fixed_size_command_is_refused(command: Command,
                                                         rule: CommandRule) -> None:
    conn = negotiated()
    fds = fds_for(command)
    exc = refused(conn, message(command, PAYLOADS[command] + b"\0"), fds)
    assert_refused_with(exc, errno.EINVAL, command)
    assert all(fd.closed for fd in fds)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("command", "rule"),
                         rows(lambda rule: rule.direction is Direction.CLIENT_TO_SERVER
                              and rule.implemented and rule.fds is FdRule.NONE))
def test_unexpected_fd_is_refused_and_closed(command: Command, rule: CommandRule) -> None:
    conn = connection_for(command)
    fd = eventfd()
    exc = refused(conn, message(command, PAYLOADS[command]), [fd])
    assert_refused_with(exc, errno.EINVAL, command)
    assert fd.closed


def test_more_fds_than_max_msg_fds_are_refused_and_closed() -> None:
    conn = negotiated()
    fds = [eventfd() for _ in range(MAX_MSG_FDS + 1)]
    payload = bytes(IrqSet(20, TRIGGER_EVENTFD, 2, 0, len(fds)))
    exc = refused(conn, message(Command.DEVICE_SET_IRQS, payload), fds)
    assert_refused_with(exc, errno.EINVAL, Command.DEVICE_SET_IRQS)
    assert all(fd.closed for fd in fds)
    assert_connection_goes_on(conn)


def test_refusal_of_a_no_reply_command_has_no_reply() -> None:
    conn = negotiated()
    exc = refused(conn, message(Command.REGION_WRITE, PAYLOADS[Command.REGION_WRITE][:-1],
                                flags=NO_REPLY))
    assert exc.errno == errno.EINVAL
    assert exc.reply is None
    assert not exc.fatal


# -- rules of single commands -----------------------------------------------------------

P = PAGE


@pytest.mark.parametrize(("payload", "nfds", "errno_"), [
    pytest.param(DmaMap(32, 3, 0, 0x10000, P), 2, errno.EINVAL, id="two-fds"),
    pytest.param(DmaMap(16, 3, 0, 0x10000, P), 1, errno.EINVAL, id="argsz"),
    pytest.param(DmaMap(32, 8, 0, 0x10000, P), 1, errno.EINVAL, id="unknown-flags"),
    pytest.param(DmaMap(32, 3, 0, 0x10000, 0), 1, errno.EINVAL, id="size-zero"),
    pytest.param(DmaMap(32, 3, 0, (1 << 64) - P, 2 * P), 1, errno.EINVAL, id="wraps"),
    pytest.param(DmaMap(32, 3, 0, 0x10010, P), 1, errno.EINVAL, id="address-unaligned"),
    pytest.param(DmaMap(32, 3, 0, 0x10000, P + 1), 1, errno.EINVAL, id="size-unaligned"),
    pytest.param(DmaMap(32, 3, 0x10, 0x10000, P), 1, errno.EINVAL, id="offset-unaligned"),
    pytest.param(DmaMap(32, 3, P, 0x10000, P), 0, errno.EINVAL, id="offset-without-fd"),
])
def test_dma_map_rules(payload: DmaMap, nfds: int, errno_: int) -> None:
    conn = negotiated()
    fds = [memfd() for _ in range(nfds)]
    exc = refused(conn, message(Command.DMA_MAP, bytes(payload)), fds)
    assert_refused_with(exc, errno_, Command.DMA_MAP)
    assert all(fd.closed for fd in fds)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("payload", "errno_"), [
    pytest.param(DmaUnmap(8, 0, 0x10000, P), errno.EINVAL, id="argsz"),
    pytest.param(DmaUnmap(24, DmaUnmapFlags.GET_DIRTY_BITMAP, 0x10000, P), errno.EOPNOTSUPP,
                 id="dirty-bitmap"),
    pytest.param(DmaUnmap(24, DmaUnmapFlags.VADDR, 0x10000, P), errno.EOPNOTSUPP, id="vaddr"),
    pytest.param(DmaUnmap(24, 8, 0x10000, P), errno.EINVAL, id="unknown-flags"),
    pytest.param(DmaUnmap(24, DmaUnmapFlags.ALL, 0x10000, P), errno.EINVAL,
                 id="all-with-a-range"),
])
def test_dma_unmap_rules(payload: DmaUnmap, errno_: int) -> None:
    conn = negotiated()
    exc = refused(conn, message(Command.DMA_UNMAP, bytes(payload)))
    assert_refused_with(exc, errno_, Command.DMA_UNMAP)
    assert_connection_goes_on(conn)


def test_dma_unmap_all_is_well_formed() -> None:
    conn = negotiated()
    payload = bytes(DmaUnmap(24, DmaUnmapFlags.ALL, 0, 0))
    assert isinstance(deliver(conn, message(Command.DMA_UNMAP, payload), [], "whole"), Request)


@pytest.mark.parametrize(("command", "payload"), [
    pytest.param(Command.DEVICE_GET_INFO, DeviceInfo(15, 0, 0, 0), id="get-info"),
    pytest.param(Command.DEVICE_GET_REGION_INFO, RegionInfo(31, 0, 0, 0, 0, 0),
                 id="get-region-info"),
    pytest.param(Command.DEVICE_GET_REGION_IO_FDS, RegionIoFds(15, 0, 4, 0), id="io-fds"),
    pytest.param(Command.DEVICE_GET_IRQ_INFO, IrqInfo(15, 0, 2, 0), id="get-irq-info"),
])
def test_argsz_below_the_fixed_reply_is_refused(command: Command, payload: object) -> None:
    conn = negotiated()
    exc = refused(conn, message(command, bytes(payload)))  # type: ignore[call-overload]
    assert_refused_with(exc, errno.EINVAL, command)


def test_get_region_io_fds_flags_must_be_zero() -> None:
    """"The client must set flags to zero"."""
    conn = negotiated()
    exc = refused(conn, message(Command.DEVICE_GET_REGION_IO_FDS,
                                bytes(RegionIoFds(256, 1, 4, 0))))
    assert_refused_with(exc, errno.EINVAL, Command.DEVICE_GET_REGION_IO_FDS)


N, B, E = IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL, IrqSetFlags.DATA_EVENTFD
M, U, T = IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK, IrqSetFlags.ACTION_TRIGGER


@pytest.mark.parametrize(("irq_set", "data", "nfds"), [
    pytest.param(IrqSet(20, N | T | 1 << 6, 2, 0, 1), b"", 0, id="unknown-flags"),
    pytest.param(IrqSet(20, N | B | T, 2, 0, 1), b"", 0, id="two-data-flags"),
    pytest.param(IrqSet(20, N | M | T, 2, 0, 1), b"", 0, id="two-actions"),
    pytest.param(IrqSet(20, T, 2, 0, 1), b"", 0, id="no-data-flag"),
    pytest.param(IrqSet(20, N, 2, 0, 1), b"", 0, id="no-action"),
    pytest.param(IrqSet(12, N | T, 2, 0, 1), b"", 0, id="argsz"),
    pytest.param(IrqSet(20, N | M, 2, 0, 0), b"", 0, id="count-0-mask"),
    pytest.param(IrqSet(20, E | T, 2, 0, 0), b"", 0, id="count-0-eventfd"),
    pytest.param(IrqSet(20, N | T, 2, 3, 0), b"", 0, id="count-0-with-start"),
    pytest.param(IrqSet(22, B | M, 2, 0, 3), b"\1\1", 0, id="bool-data-short"),
    pytest.param(IrqSet(24, N | M, 2, 0, 3), b"\1\1\1\1", 0, id="data-without-bool"),
    pytest.param(IrqSet(20, E | T, 2, 0, 3), b"", 2, id="fds-not-count"),
    pytest.param(IrqSet(20, N | T, 2, 0, 1), b"", 1, id="fd-without-eventfd"),
])
def test_set_irqs_rules(irq_set: IrqSet, data: bytes, nfds: int) -> None:
    conn = negotiated()
    fds = [eventfd() for _ in range(nfds)]
    exc = refused(conn, message(Command.DEVICE_SET_IRQS, bytes(irq_set) + data), fds)
    assert_refused_with(exc, errno.EINVAL, Command.DEVICE_SET_IRQS)
    assert all(fd.closed for fd in fds)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("command", "payload", "errno_"), [
    pytest.param(Command.REGION_READ, bytes(RegionAccess(0, 7, 0)), errno.EINVAL,
                 id="read-count-0"),
    pytest.param(Command.REGION_READ, bytes(RegionAccess(0, 7, MAX_DATA_XFER_SIZE + 1)),
                 errno.E2BIG, id="read-too-big"),
    pytest.param(Command.REGION_WRITE, bytes(RegionAccess(0, 7, 4)) + b"abc", errno.EINVAL,
                 id="write-data-short"),
    pytest.param(Command.REGION_WRITE, bytes(RegionAccess(0, 7, 2)) + b"abc", errno.EINVAL,
                 id="write-data-long"),
    pytest.param(Command.REGION_WRITE, bytes(RegionAccess(0, 7, 0)), errno.EINVAL,
                 id="write-count-0"),
    pytest.param(Command.REGION_WRITE, bytes(RegionAccess(0, 7, MAX_DATA_XFER_SIZE + 1)),
                 errno.E2BIG, id="write-too-big"),
])
def test_region_access_rules(command: Command, payload: bytes, errno_: int) -> None:
    conn = negotiated()
    exc = refused(conn, message(command, payload))
    assert_refused_with(exc, errno_, command)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize("payload", [
    pytest.param(bytes(WriteMultiHeader(0)), id="no-writes"),
    pytest.param(write_multi((4, 0, b"ab"))[:-1], id="length"),
    pytest.param(bytes(WriteMultiHeader(1)) + bytes(SingleWrite(0, 4, 0)), id="count-0"),
    pytest.param(bytes(WriteMultiHeader(1)) + bytes(SingleWrite(0, 4, 9)), id="count-9"),
])
def test_write_multi_rules(payload: bytes) -> None:
    conn = negotiated()
    exc = refused(conn, message(Command.REGION_WRITE_MULTI, payload, flags=0))
    assert_refused_with(exc, errno.EINVAL, Command.REGION_WRITE_MULTI)
    assert_connection_goes_on(conn)


def test_write_multi_needs_write_multiple() -> None:
    conn = negotiated({"capabilities": {}})
    exc = refused(conn, message(Command.REGION_WRITE_MULTI, PAYLOADS[Command.REGION_WRITE_MULTI]))
    assert_refused_with(exc, errno.EINVAL, Command.REGION_WRITE_MULTI)


# -- commands from the server and their replies ------------------------------------------


def test_server_command_gets_its_reply_by_message_id() -> None:
    conn = negotiated()
    msg_id, data = conn.command(Command.DMA_READ, bytes(DmaAccess(0x1000, 4)))
    assert data[:HEADER_SIZE] == struct.pack("=HHIII", msg_id, Command.DMA_READ,
                                             HEADER_SIZE + 16, 0, 0)
    assert conn.pending_commands == {msg_id: Command.DMA_READ}
    body = bytes(DmaAccess(0x1000, 4)) + b"abcd"
    reply = deliver(conn, message(Command.DMA_READ, body, msg_id=msg_id, flags=REPLY), [],
                    "bytewise")
    assert isinstance(reply, Reply)
    assert (reply.msg_id, reply.command, reply.failed) == (msg_id, Command.DMA_READ, False)
    assert reply.payload == body
    assert conn.pending_commands == {}


def test_server_command_error_reply() -> None:
    conn = negotiated()
    msg_id, _ = conn.command(Command.DMA_WRITE, bytes(DmaAccess(0, 1)) + b"x")
    conn.receive(message(Command.DMA_WRITE, msg_id=msg_id, flags=REPLY | ERROR,
                         error=errno.EFAULT))
    reply = conn.next_event()
    assert isinstance(reply, Reply)
    assert reply.failed and reply.error == errno.EFAULT


def test_message_ids_of_our_commands_skip_ids_in_flight() -> None:
    conn = negotiated()
    first, _ = conn.command(Command.DMA_READ, bytes(DmaAccess(0, 1)))
    ids = {first}
    for _ in range(0xFFFF):
        msg_id, _ = conn.command(Command.DMA_READ, bytes(DmaAccess(0, 1)))
        assert msg_id not in ids
        ids.add(msg_id)
    with pytest.raises(ValueError):
        conn.command(Command.DMA_READ, bytes(DmaAccess(0, 1)))


def test_only_server_to_client_commands_can_be_sent() -> None:
    with pytest.raises(ValueError):
        negotiated().command(Command.REGION_READ, b"")


def test_reply_to_no_command_is_refused_without_an_answer() -> None:
    conn = negotiated()
    exc = refused(conn, message(Command.DMA_READ, msg_id=99, flags=REPLY))
    assert exc.reply is None and not exc.fatal
    assert_connection_goes_on(conn)


def test_reply_naming_another_command_is_refused() -> None:
    conn = negotiated()
    msg_id, _ = conn.command(Command.DMA_READ, bytes(DmaAccess(0, 1)))
    exc = refused(conn, message(Command.DMA_WRITE, msg_id=msg_id, flags=REPLY))
    assert exc.reply is None and not exc.fatal


def test_reply_with_fds_is_refused_and_they_are_closed() -> None:
    conn = negotiated()
    msg_id, _ = conn.command(Command.DMA_READ, bytes(DmaAccess(0, 1)))
    fd = eventfd()
    exc = refused(conn, message(Command.DMA_READ, bytes(DmaAccess(0, 1)) + b"x", msg_id=msg_id,
                                flags=REPLY), [fd])
    assert fd.closed
    assert not exc.fatal
    assert conn.pending_commands == {}


def test_forget_drops_a_waiting_command() -> None:
    conn = negotiated()
    msg_id, _ = conn.command(Command.DMA_READ, bytes(DmaAccess(0, 1)))
    conn.forget(msg_id)
    refused(conn, message(Command.DMA_READ, msg_id=msg_id, flags=REPLY))


@pytest.mark.parametrize("size", [4, 1 << 30])  # smaller than the header; over the limit
def test_fds_of_a_message_refused_from_its_header_are_closed(size: int) -> None:
    conn = negotiated()
    fd = OwnedFd(os.eventfd(0))
    conn.receive(struct.pack("=HHIII", 1, Command.DEVICE_RESET, size, 0, 0), [fd])
    with pytest.raises(MessageError):
        conn.next_event()
    assert fd.closed
    late = OwnedFd(os.eventfd(0))
    conn.receive(b"x", [late])  # after the failure: closed at once
    assert late.closed
