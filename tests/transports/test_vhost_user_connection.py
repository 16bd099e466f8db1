"""The vhost-user connection core: a byte fixture for every request, one test per rule.

Every row of ``REQUESTS`` gets a well-formed message with real fds (eventfds,
memfds), fed whole, one byte at a time and split between header and body. Each
validation rule then gets a message that breaks it; after each fault the fds
that came with the message are closed and a fatal fault ends the connection.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable

import pytest

from outboard.backend.errors import RemoteProtocolError
from outboard.backend.fd import OwnedFd
from outboard.transports.vhost_user.connection import NEED_DATA, BackendConnection, Request
from outboard.transports.vhost_user.wire import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    PAYLOAD_SIZES,
    REQUESTS,
    SUPPORTED_PROTOCOL_FEATURES,
    VHOST_USER_VRING_NOFD_MASK,
    ConfigHeader,
    DeviceStateTransfer,
    FdRule,
    Flags,
    FrontendReq,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    MemoryRegionDescription,
    MemoryTableHeader,
    Payload,
    ProtocolFeature,
    RequestRule,
    SingleMemoryRegion,
    VringAddress,
    VringState,
)

pytestmark = pytest.mark.usefixtures("fd_leak_check")

VERSION = 0x1
REPLY = 0x4
NEED_REPLY = 0x8
PAGE = 4096
UVA = 0x7F00_0000_0000
EVERY_PROTOCOL_FEATURE = sum(1 << feature for feature in ProtocolFeature)


def message(code: int, payload: bytes = b"", *, flags: int = VERSION,
            size: int | None = None) -> bytes:
    """A front-end message: header (request, flags, size) and payload."""
    return struct.pack("=III", code, flags, len(payload) if size is None else size) + payload


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def memfd(size: int = PAGE) -> OwnedFd:
    fd = OwnedFd(os.memfd_create("outboard-test", os.MFD_CLOEXEC))
    os.ftruncate(fd.fd, size)
    return fd


def region(index: int = 0) -> MemoryRegionDescription:
    return MemoryRegionDescription(index * PAGE, PAGE, UVA + index * PAGE, 0)


def memory_table(count: int, slots: int | None = None) -> bytes:
    """SET_MEM_TABLE's payload: ``count`` regions, in ``slots`` slots (default: count)."""
    slots = count if slots is None else slots
    regions = b"".join(bytes(region(i)) for i in range(count))
    return bytes(MemoryTableHeader(count, 0)) + regions.ljust(
        slots * len(bytes(MemoryRegionDescription())), b"\0")


#: a well-formed payload of every kind
PAYLOADS: dict[Payload, bytes] = {
    Payload.NONE: b"",
    Payload.U64: u64(0),
    Payload.STATE: bytes(VringState(0, 256)),
    Payload.ADDR: bytes(VringAddress(0, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0)),
    Payload.MEM_TABLE: memory_table(1),
    Payload.MEM_REGION: bytes(SingleMemoryRegion(0, region())),
    Payload.LOG: bytes(LogDescription(PAGE, 0)),
    Payload.IOTLB: bytes(IotlbMsg(0x1000, PAGE, UVA, 3, 2)),
    Payload.CONFIG: bytes(ConfigHeader(0, 4, 0)) + b"\1\2\3\4",
    Payload.INFLIGHT: bytes(InflightDescription(0, 0, 1, 256)),
    Payload.DEVICE_STATE: bytes(DeviceStateTransfer(0, 0)),
    Payload.UUID: bytes(range(16)),
    Payload.ANY: bytes(range(40)),
}

#: payload kinds whose fds are shared memory
MEMORY_PAYLOADS = {Payload.MEM_TABLE, Payload.MEM_REGION, Payload.LOG, Payload.INFLIGHT}


def fds_for(rule: RequestRule) -> list[OwnedFd]:
    """The fds a well-formed message of this row carries."""
    make = memfd if rule.payload in MEMORY_PAYLOADS else eventfd
    match rule.fds:
        case FdRule.NONE | FdRule.IGNORED:
            return []
        case FdRule.ONE | FdRule.OPTIONAL | FdRule.PER_REGION:
            return [make()]


def rows(condition: Callable[[RequestRule], bool] | None = None) -> list[object]:
    """``REQUESTS`` as pytest parameters, optionally only the rows where ``condition``."""
    return [pytest.param(code, rule, id=code.name) for code, rule in REQUESTS.items()
            if condition is None or condition(rule)]


def connection_for(rule: RequestRule) -> BackendConnection:
    """A connection that offers every protocol feature, with the row's negotiated."""
    conn = BackendConnection(EVERY_PROTOCOL_FEATURE)
    if rule.needs is not None:
        negotiate(conn, 1 << rule.needs)
    return conn


def negotiate(conn: BackendConnection, features: int) -> None:
    conn.receive(message(FrontendReq.SET_PROTOCOL_FEATURES, u64(features)))
    event = conn.next_event()
    assert isinstance(event, Request)
    assert conn.protocol_features == features


def pieces(data: bytes, split: str) -> list[bytes]:
    if split == "whole":
        return [data]
    if split == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    assert split == "header-body"
    return [data[:HEADER_SIZE], data[HEADER_SIZE:]] if len(data) > HEADER_SIZE else [data]


def deliver(conn: BackendConnection, data: bytes, fds: Iterable[OwnedFd], split: str) -> Request:
    """Feed one message in pieces (the fds with the first), checking that the core
    wants more until the last piece, and that ``bytes_needed`` never asks for more
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
    assert isinstance(event, Request)
    return event


def refused(conn: BackendConnection, data: bytes, fds: Iterable[OwnedFd] = ()
            ) -> RemoteProtocolError:
    conn.receive(data, fds)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    return info.value


def assert_connection_failed(conn: BackendConnection) -> None:
    """After a fatal fault the core hands out nothing more, not even a good request."""
    conn.receive(message(FrontendReq.GET_FEATURES))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn.close()


def assert_connection_goes_on(conn: BackendConnection) -> None:
    conn.receive(message(FrontendReq.GET_FEATURES))
    event = conn.next_event()
    assert isinstance(event, Request)
    assert event.request is FrontendReq.GET_FEATURES
    assert conn.next_event() is NEED_DATA
    assert not conn.has_pending()


# -- the fixtures themselves -----------------------------------------------------


def test_there_is_a_payload_fixture_for_every_payload_kind() -> None:
    assert set(PAYLOADS) == set(Payload)
    for kind, size in PAYLOAD_SIZES.items():
        assert len(PAYLOADS[kind]) == size, kind


def test_every_request_has_a_row() -> None:
    assert set(REQUESTS) == set(FrontendReq)


# -- well-formed messages, every row ---------------------------------------------


@pytest.mark.parametrize("split", ["whole", "bytewise", "header-body"])
@pytest.mark.parametrize("flags", [VERSION, VERSION | NEED_REPLY], ids=["plain", "need-reply"])
@pytest.mark.parametrize(("code", "rule"), rows())
def test_well_formed_request_comes_out_whole(code: FrontendReq, rule: RequestRule,
                                             flags: int, split: str) -> None:
    conn = connection_for(rule)
    payload = PAYLOADS[rule.payload]
    fds = fds_for(rule)
    req = deliver(conn, message(code, payload, flags=flags), fds, split)
    try:
        assert req.request is code
        assert req.flags == flags
        assert req.need_reply == bool(flags & NEED_REPLY)
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


@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: rule.fds is FdRule.OPTIONAL))
def test_optional_fd_may_be_left_out_with_the_no_fd_flag(code: FrontendReq,
                                                         rule: RequestRule) -> None:
    conn = connection_for(rule)
    req = deliver(conn, message(code, u64(VHOST_USER_VRING_NOFD_MASK | 3)), [], "whole")
    assert req.fds == []
    assert req.nofd
    assert req.vring_index == 3


def test_ignored_fd_is_closed_by_the_core() -> None:
    conn = connection_for(REQUESTS[FrontendReq.REM_MEM_REG])
    fd = memfd()
    req = deliver(conn, message(FrontendReq.REM_MEM_REG, PAYLOADS[Payload.MEM_REGION]),
                  [fd], "whole")
    assert req.fds == []
    assert fd.closed


def test_memory_table_may_come_in_all_eight_slots() -> None:
    """QEMU sends the table sized for every slot, whatever the region count."""
    conn = connection_for(REQUESTS[FrontendReq.SET_MEM_TABLE])
    fds = [memfd(), memfd()]
    req = deliver(conn, message(FrontendReq.SET_MEM_TABLE, memory_table(2, MAX_MEM_REGIONS)),
                  fds, "header-body")
    assert [(r.guest_phys_addr, r.userspace_addr) for r in req.regions] == [
        (0, UVA), (PAGE, UVA + PAGE)]
    assert req.fds == fds
    req.close()


def test_messages_back_to_back_in_one_chunk() -> None:
    conn = BackendConnection()
    conn.receive(message(FrontendReq.GET_FEATURES)
                 + message(FrontendReq.SET_VRING_NUM, bytes(VringState(1, 128)))
                 + message(FrontendReq.GET_PROTOCOL_FEATURES)[:5])
    first, second = conn.next_event(), conn.next_event()
    assert isinstance(first, Request) and isinstance(second, Request)
    assert first.request is FrontendReq.GET_FEATURES
    assert (second.state.index, second.state.num) == (1, 128)
    assert conn.next_event() is NEED_DATA
    assert conn.has_pending()
    assert conn.bytes_needed() == HEADER_SIZE - 5


def test_reads_sized_by_bytes_needed_keep_fds_with_their_message() -> None:
    """The kernel attaches fds to the first byte of the message they were sent with,
    and one read may return the tail of one message with the head of the next.
    Reading no more than ``bytes_needed`` never crosses a message, so every fd
    lands with its own request."""
    sent = [
        (FrontendReq.SET_VRING_CALL, u64(0), [eventfd()]),
        (FrontendReq.GET_FEATURES, b"", []),
        (FrontendReq.SET_VRING_KICK, u64(1), [eventfd()]),
        (FrontendReq.SET_VRING_ERR, u64(VHOST_USER_VRING_NOFD_MASK), []),
        (FrontendReq.SET_MEM_TABLE, memory_table(2), [memfd(), memfd()]),
    ]
    stream = b""
    fds_at: dict[int, list[OwnedFd]] = {}
    for code, payload, fds in sent:
        fds_at[len(stream)] = fds
        stream += message(code, payload)

    conn = BackendConnection()
    received: list[Request] = []
    position = 0
    while position < len(stream):
        end = position + conn.bytes_needed()
        conn.receive(stream[position:end],
                     [fd for offset, fds in fds_at.items() if position <= offset < end
                      for fd in fds])
        position = end
        while isinstance(event := conn.next_event(), Request):
            received.append(event)
    assert [(r.request, r.fds) for r in received] == [(code, fds) for code, _, fds in sent]
    for req in received:
        req.close()


# -- one test per validation rule ------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 3])
def test_bad_version_is_fatal(version: int) -> None:
    conn = BackendConnection()
    exc = refused(conn, message(FrontendReq.GET_FEATURES, flags=version))
    assert exc.fatal
    assert_connection_failed(conn)


def test_bad_version_is_fatal_from_the_header_alone() -> None:
    conn = BackendConnection()
    exc = refused(conn, message(FrontendReq.SET_FEATURES, flags=2, size=8))
    assert exc.fatal
    assert_connection_failed(conn)


def test_reply_flag_on_a_request_is_fatal() -> None:
    conn = BackendConnection()
    exc = refused(conn, message(FrontendReq.SET_FEATURES, flags=VERSION | REPLY, size=8))
    assert exc.fatal
    assert_connection_failed(conn)


def test_oversized_payload_is_fatal_before_the_body_arrives() -> None:
    conn = BackendConnection()
    conn.receive(message(FrontendReq.SET_CONFIG, size=MAX_PAYLOAD + 1))
    assert conn.bytes_needed() == MAX_PAYLOAD + 1  # bounded, whatever the size field says
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.fatal
    assert_connection_failed(conn)


def test_payload_of_the_largest_size_waits_for_its_body() -> None:
    conn = BackendConnection()
    conn.receive(message(FrontendReq.SET_CONFIG, size=MAX_PAYLOAD))
    assert conn.next_event() is NEED_DATA
    assert conn.bytes_needed() == MAX_PAYLOAD


def test_huge_size_field_is_fatal() -> None:
    conn = BackendConnection()
    conn.receive(message(FrontendReq.SET_CONFIG, size=0xFFFF_FFFF))
    assert conn.bytes_needed() == MAX_PAYLOAD + 1
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.fatal


HEADER_FAULTS = [
    pytest.param(2, 8, id="bad-version"),
    pytest.param(VERSION | REPLY, 8, id="reply-flag"),
    pytest.param(VERSION, MAX_PAYLOAD + 1, id="oversized"),
]


@pytest.mark.parametrize(("flags", "size"), HEADER_FAULTS)
def test_fds_of_a_message_refused_from_its_header_are_closed(flags: int, size: int) -> None:
    conn = BackendConnection()
    fd = eventfd()
    exc = refused(conn, message(FrontendReq.SET_VRING_CALL, flags=flags, size=size), [fd])
    assert exc.fatal
    try:
        assert fd.closed
    finally:
        conn.close()


@pytest.mark.parametrize("code", [0, max(FrontendReq) + 1, 0xFFFF_FFFF])
def test_unknown_request_is_fatal(code: int) -> None:
    conn = BackendConnection()
    fd = eventfd()
    exc = refused(conn, message(code, u64(0)), [fd])
    assert exc.fatal
    assert fd.closed
    assert_connection_failed(conn)


def _wrong_sizes() -> list[object]:
    params: list[object] = []
    for code, rule in REQUESTS.items():
        if rule.payload not in PAYLOAD_SIZES:
            continue  # sized by their own rules, tested below
        payload = PAYLOADS[rule.payload]
        params.append(pytest.param(code, rule, payload + b"\0", id=f"{code.name}-long"))
        if payload:
            params.append(pytest.param(code, rule, payload[:-1], id=f"{code.name}-short"))
    return params


@pytest.mark.parametrize(("code", "rule", "payload"), _wrong_sizes())
def test_wrong_payload_size_is_fatal(code: FrontendReq, rule: RequestRule,
                                     payload: bytes) -> None:
    conn = connection_for(rule)
    fds = fds_for(rule)
    exc = refused(conn, message(code, payload), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


@pytest.mark.parametrize("payload", [
    pytest.param(bytes(7), id="shorter-than-its-header"),
    pytest.param(memory_table(2)[:-32], id="fewer-regions-than-counted"),
    pytest.param(memory_table(1) + bytes(8), id="between-count-and-all-slots"),
    pytest.param(memory_table(1, MAX_MEM_REGIONS) + bytes(32), id="more-than-all-slots"),
])
def test_memory_table_size_must_match_its_region_count(payload: bytes) -> None:
    conn = BackendConnection()
    fds = [memfd(), memfd()]
    exc = refused(conn, message(FrontendReq.SET_MEM_TABLE, payload), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


def test_too_many_regions_is_fatal() -> None:
    conn = BackendConnection()
    count = MAX_MEM_REGIONS + 1
    fds = [memfd() for _ in range(MAX_FDS)]
    exc = refused(conn, message(FrontendReq.SET_MEM_TABLE, memory_table(count)), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


@pytest.mark.parametrize("code", [FrontendReq.GET_CONFIG, FrontendReq.SET_CONFIG])
@pytest.mark.parametrize("payload", [
    pytest.param(bytes(ConfigHeader(0, 4, 0)) + bytes(3), id="short"),
    pytest.param(bytes(ConfigHeader(0, 4, 0)) + bytes(5), id="long"),
    pytest.param(bytes(ConfigHeader(0, 0, 0))[:11], id="shorter-than-its-header"),
    pytest.param(bytes(ConfigHeader(0, MAX_CONFIG_SIZE + 1, 0)) + bytes(MAX_CONFIG_SIZE + 1),
                 id="over-the-config-limit"),
])
def test_config_size_must_match_its_payload(code: FrontendReq, payload: bytes) -> None:
    conn = connection_for(REQUESTS[code])
    exc = refused(conn, message(code, payload))
    assert exc.fatal
    assert_connection_failed(conn)


def test_config_of_the_largest_size_is_accepted() -> None:
    conn = connection_for(REQUESTS[FrontendReq.SET_CONFIG])
    payload = bytes(ConfigHeader(0, MAX_CONFIG_SIZE, 0)) + bytes(MAX_CONFIG_SIZE)
    req = deliver(conn, message(FrontendReq.SET_CONFIG, payload), [], "whole")
    head, data = req.config
    assert head.size == len(data) == MAX_CONFIG_SIZE


@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: rule.fds is FdRule.NONE))
def test_fd_on_a_request_without_fds_is_fatal(code: FrontendReq, rule: RequestRule) -> None:
    conn = connection_for(rule)
    fd = eventfd()
    exc = refused(conn, message(code, PAYLOADS[rule.payload]), [fd])
    assert exc.fatal
    assert fd.closed
    assert_connection_failed(conn)


@pytest.mark.parametrize("count", [0, 2])
@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: rule.fds is FdRule.ONE))
def test_request_with_one_fd_needs_exactly_one(code: FrontendReq, rule: RequestRule,
                                               count: int) -> None:
    conn = connection_for(rule)
    fds = [memfd() for _ in range(count)]
    exc = refused(conn, message(code, PAYLOADS[rule.payload]), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


@pytest.mark.parametrize(("value", "count"), [
    pytest.param(0, 0, id="fd-missing"),
    pytest.param(VHOST_USER_VRING_NOFD_MASK, 1, id="fd-despite-no-fd-flag"),
    pytest.param(0, 2, id="two-fds"),
])
@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: rule.fds is FdRule.OPTIONAL))
def test_optional_fd_must_match_the_no_fd_flag(code: FrontendReq, rule: RequestRule,
                                               value: int, count: int) -> None:
    conn = connection_for(rule)
    fds = [eventfd() for _ in range(count)]
    exc = refused(conn, message(code, u64(value)), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


@pytest.mark.parametrize("reserved", [1 << 9, 1 << 31, 1 << 63])
@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: rule.fds is FdRule.OPTIONAL))
def test_reserved_bits_of_a_vring_fd_request_are_fatal(code: FrontendReq, rule: RequestRule,
                                                       reserved: int) -> None:
    conn = connection_for(rule)
    fd = eventfd()
    exc = refused(conn, message(code, u64(reserved)), [fd])
    assert exc.fatal
    assert fd.closed
    assert_connection_failed(conn)


@pytest.mark.parametrize(("regions", "count"), [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_memory_table_needs_one_fd_per_region(regions: int, count: int) -> None:
    conn = BackendConnection()
    fds = [memfd() for _ in range(count)]
    exc = refused(conn, message(FrontendReq.SET_MEM_TABLE, memory_table(regions)), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


def test_more_fds_than_a_message_may_carry_is_fatal() -> None:
    conn = BackendConnection()
    fds = [memfd() for _ in range(MAX_FDS + 1)]
    exc = refused(conn, message(FrontendReq.SET_MEM_TABLE, memory_table(MAX_MEM_REGIONS)), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


def test_ignored_fd_rule_allows_at_most_one() -> None:
    conn = connection_for(REQUESTS[FrontendReq.REM_MEM_REG])
    fds = [memfd(), memfd()]
    exc = refused(conn, message(FrontendReq.REM_MEM_REG, PAYLOADS[Payload.MEM_REGION]), fds)
    assert exc.fatal
    assert all(fd.closed for fd in fds)
    assert_connection_failed(conn)


@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: rule.needs is not None))
def test_request_without_its_protocol_feature_is_refused(code: FrontendReq,
                                                         rule: RequestRule) -> None:
    conn = BackendConnection(EVERY_PROTOCOL_FEATURE)
    payload = PAYLOADS[rule.payload]
    fds = fds_for(rule)
    exc = refused(conn, message(code, payload, flags=VERSION | NEED_REPLY), fds)
    assert not exc.fatal
    assert isinstance(exc.request, Request)
    assert exc.request.request is code
    assert exc.request.flags == VERSION | NEED_REPLY
    assert exc.request.payload == payload
    assert exc.request.fds == []
    assert all(fd.closed for fd in fds)
    assert_connection_goes_on(conn)


@pytest.mark.parametrize(("code", "rule"), rows(
    lambda rule: rule.needs is not None and not SUPPORTED_PROTOCOL_FEATURES >> rule.needs & 1))
def test_request_needing_a_feature_never_offered_is_refused(code: FrontendReq,
                                                            rule: RequestRule) -> None:
    assert rule.needs is not None
    conn = BackendConnection()
    exc = refused(conn, message(FrontendReq.SET_PROTOCOL_FEATURES, u64(1 << rule.needs)))
    assert not exc.fatal
    assert conn.protocol_features == 0
    fds = fds_for(rule)
    exc = refused(conn, message(code, PAYLOADS[rule.payload]), fds)
    assert not exc.fatal
    assert isinstance(exc.request, Request)
    assert exc.request.request is code
    assert all(fd.closed for fd in fds)
    assert_connection_goes_on(conn)


def test_protocol_features_never_offered_are_refused() -> None:
    offered = 1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
    conn = BackendConnection(offered)
    negotiate(conn, 1 << ProtocolFeature.MQ)
    exc = refused(conn, message(FrontendReq.SET_PROTOCOL_FEATURES,
                                u64(offered | 1 << ProtocolFeature.STATUS)))
    assert not exc.fatal
    assert isinstance(exc.request, Request)
    assert exc.request.u64 == offered | 1 << ProtocolFeature.STATUS
    assert conn.protocol_features == 1 << ProtocolFeature.MQ  # unchanged
    assert_connection_goes_on(conn)


def test_fds_without_data_are_closed() -> None:
    conn = BackendConnection()
    fd = eventfd()
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive(b"", [fd])
    assert info.value.fatal
    assert fd.closed
    assert not conn.has_pending()


def test_fds_without_data_end_the_connection() -> None:
    conn = BackendConnection()
    with pytest.raises(RemoteProtocolError):
        conn.receive(b"", [eventfd()])
    assert_connection_failed(conn)


# -- closing -----------------------------------------------------------------------


def test_close_releases_buffered_fds() -> None:
    conn = BackendConnection()
    fds = [memfd(), memfd()]
    conn.receive(message(FrontendReq.SET_MEM_TABLE, memory_table(2))[:20], fds)
    assert conn.next_event() is NEED_DATA
    assert conn.has_pending()
    conn.close()
    assert all(fd.closed for fd in fds)
    assert not conn.has_pending()


# -- answers -------------------------------------------------------------------------


def test_reply_carries_the_reply_flag_version_and_size() -> None:
    conn = BackendConnection()
    conn.receive(message(FrontendReq.GET_VRING_BASE, bytes(VringState(2, 0))))
    req = conn.next_event()
    assert isinstance(req, Request)
    payload = bytes(VringState(2, 77))
    answer = conn.reply(req, payload)
    assert answer == struct.pack("=III", FrontendReq.GET_VRING_BASE, VERSION | REPLY,
                                 len(payload)) + payload
    assert Flags.REPLY == REPLY and Flags.NEED_REPLY == NEED_REPLY


def test_reply_never_echoes_need_reply() -> None:
    conn = BackendConnection()
    conn.receive(message(FrontendReq.GET_FEATURES, flags=VERSION | NEED_REPLY))
    req = conn.next_event()
    assert isinstance(req, Request)
    assert conn.reply(req, u64(5))[4:8] == struct.pack("=I", VERSION | REPLY)


def _request(conn: BackendConnection, code: FrontendReq, *, need_reply: bool) -> Request:
    flags = VERSION | (NEED_REPLY if need_reply else 0)
    return Request(code, flags, PAYLOADS[REQUESTS[code].payload], [], REQUESTS[code])


def test_ack_needs_reply_ack_negotiated() -> None:
    conn = BackendConnection()
    negotiate(conn, SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.REPLY_ACK))
    req = _request(conn, FrontendReq.SET_VRING_NUM, need_reply=True)
    assert conn.ack(req, True) is None
    assert conn.ack(req, False) is None


def test_ack_needs_the_need_reply_flag() -> None:
    conn = BackendConnection()
    negotiate(conn, 1 << ProtocolFeature.REPLY_ACK)
    req = _request(conn, FrontendReq.SET_VRING_NUM, need_reply=False)
    assert conn.ack(req, True) is None
    assert conn.ack(req, False) is None


@pytest.mark.parametrize(("code", "rule"), rows())
def test_ack_only_for_requests_without_a_reply_of_their_own(code: FrontendReq,
                                                            rule: RequestRule) -> None:
    conn = BackendConnection()
    negotiate(conn, 1 << ProtocolFeature.REPLY_ACK)
    req = _request(conn, code, need_reply=True)
    if rule.replies:
        assert conn.ack(req, True) is None
        assert conn.ack(req, False) is None
    else:
        header = struct.pack("=III", code, VERSION | REPLY, 8)
        assert conn.ack(req, True) == header + u64(0)
        assert conn.ack(req, False) == header + u64(1)
