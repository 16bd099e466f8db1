"""VhostUserBackend against a real device, without sockets.

A ``Frontend`` plays QEMU: it builds request bytes, feeds them through the
connection core and hands the events to ``dispatch``, the way the server does.
Guest RAM is a memfd; the back-end gets its own dup of it, so the test can
write guest memory through its fd and read what the back-end sees.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from outboard.backend import (
    DeviceError,
    DeviceState,
    DeviceStatus,
    Feature,
    QueueSpec,
    SplitQueue,
    VirtioDevice,
    VirtioDeviceId,
    bit,
)
from outboard.backend.errors import RemoteProtocolError
from outboard.backend.fd import OwnedFd
from outboard.backend.runtime import Runtime
from outboard.devices.rng import RngDevice
from outboard.transports.vhost_user.backend import MAX_MEM_SLOTS, VhostUserBackend
from outboard.transports.vhost_user.connection import BackendConnection, Request
from outboard.transports.vhost_user.wire import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    REQUESTS,
    SUPPORTED_PROTOCOL_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VRING_NOFD_MASK,
    ConfigHeader,
    FrontendReq,
    Header,
    MemoryRegionDescription,
    MemoryTableHeader,
    ProtocolFeature,
    RequestRule,
    SingleMemoryRegion,
    VringAddress,
    VringState,
)

from .test_vhost_user_connection import PAYLOADS, fds_for, rows

pytestmark = pytest.mark.usefixtures("fd_leak_check")

VERSION = 0x1
REPLY = 0x4
NEED_REPLY = 0x8
PAGE = 4096
UVA = 0x7F00_0000_0000
#: the ring layout in guest RAM used by the queue tests (queue size 8)
QUEUE_SIZE = 8
DESC_GPA, AVAIL_GPA, USED_GPA, BUFFER_GPA = 0x0000, 0x1000, 0x2000, 0x3000
VIRTQ_DESC_F_WRITE = 2


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def region(gpa: int, size: int, uva: int, mmap_offset: int = 0) -> MemoryRegionDescription:
    return MemoryRegionDescription(gpa, size, uva, mmap_offset)


def single_region(desc: MemoryRegionDescription) -> bytes:
    return bytes(SingleMemoryRegion(0, desc))


def memory_table(*regions: MemoryRegionDescription) -> bytes:
    return bytes(MemoryTableHeader(len(regions), 0)) + b"".join(bytes(r) for r in regions)


def vring_address(index: int, desc: int, avail: int, used: int) -> bytes:
    return bytes(VringAddress(index, 0, desc, used, avail, 0))


class MemfdRam:
    """A memfd the test keeps; the back-end is given dups of it."""

    def __init__(self, size: int = 16 * PAGE, *, name: str = "outboard-test-ram") -> None:
        self.size = size
        self.fd = OwnedFd(os.memfd_create(name, os.MFD_CLOEXEC))
        os.ftruncate(self.fd.fd, size)

    def give(self) -> OwnedFd:
        """An fd for the back-end to own."""
        return OwnedFd(os.dup(self.fd.fd))

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd.fd, data, offset)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd.fd, size, offset)

    def close(self) -> None:
        self.fd.close()


class Frontend:
    """Plays the front-end: request bytes through the core into ``dispatch``."""

    def __init__(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self.conn = backend.conn

    @property
    def state(self) -> DeviceState:
        return self.backend.state

    def send(self, code: FrontendReq, payload: bytes = b"", fds: Sequence[OwnedFd] = (),
             *, need_reply: bool = False) -> bytes | None:
        """One request in; what the back-end sends back, if anything."""
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        self.conn.receive(struct.pack("=III", code, flags, len(payload)) + payload, fds)
        try:
            event = self.conn.next_event()
        except RemoteProtocolError as exc:
            if exc.fatal or not isinstance(exc.request, Request):
                raise
            return self.backend.refuse(exc.request, exc)
        assert isinstance(event, Request)
        return self.backend.dispatch(event)

    def call(self, code: FrontendReq, payload: bytes = b"") -> bytes:
        """A request with a reply of its own: the reply's payload."""
        answer = self.send(code, payload)
        assert answer is not None
        head = Header.from_buffer_copy(answer)
        assert (head.request, head.flags) == (code, VERSION | REPLY)
        assert head.size == len(answer) - HEADER_SIZE
        return answer[HEADER_SIZE:]

    def get_u64(self, code: FrontendReq) -> int:
        value: int = struct.unpack("=Q", self.call(code))[0]
        return value

    def acked(self, code: FrontendReq, payload: bytes = b"",
              fds: Sequence[OwnedFd] = ()) -> bool:
        """Send with need_reply (REPLY_ACK negotiated): did the back-end succeed?"""
        answer = self.send(code, payload, fds, need_reply=True)
        assert answer is not None
        assert answer[:HEADER_SIZE] == struct.pack("=III", code, VERSION | REPLY, 8)
        return answer[HEADER_SIZE:] == u64(0)

    def negotiate(self, features: int = bit(Feature.VERSION_1),
                  protocol_features: int = SUPPORTED_PROTOCOL_FEATURES) -> None:
        """What QEMU does first: features with protocol features, then those."""
        assert self.get_u64(FrontendReq.GET_FEATURES) >> VHOST_USER_F_PROTOCOL_FEATURES & 1
        self.send(FrontendReq.SET_FEATURES, u64(features | 1 << VHOST_USER_F_PROTOCOL_FEATURES))
        assert self.get_u64(FrontendReq.GET_PROTOCOL_FEATURES) & protocol_features \
            == protocol_features
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, u64(protocol_features))

    def map_ram(self, ram: MemfdRam) -> None:
        """The whole of ``ram`` as the only region, at gpa 0 and uva UVA."""
        assert self.acked(FrontendReq.SET_MEM_TABLE, memory_table(region(0, ram.size, UVA)),
                          [ram.give()])

    def setup_queue(self, index: int = 0) -> None:
        assert self.acked(FrontendReq.SET_VRING_NUM, bytes(VringState(index, QUEUE_SIZE)))
        assert self.acked(FrontendReq.SET_VRING_ADDR, vring_address(
            index, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA))
        assert self.acked(FrontendReq.SET_VRING_BASE, bytes(VringState(index, 0)))


MakeRam = Callable[..., MemfdRam]


@pytest.fixture
def guest_ram() -> Iterator[MakeRam]:
    """Makes MemfdRam, closed again after the test."""
    made: list[MemfdRam] = []

    def make(size: int = 16 * PAGE) -> MemfdRam:
        made.append(MemfdRam(size))
        return made[-1]

    yield make
    for ram in made:
        ram.close()


@asynccontextmanager
async def serving(device: VirtioDevice | None = None) -> AsyncIterator[Frontend]:
    """A back-end for ``device`` (an RngDevice by default), its runtime in a nursery."""
    state = DeviceState(device if device is not None else RngDevice())
    conn = BackendConnection()
    async with trio.open_nursery() as nursery:
        backend = VhostUserBackend(state, Runtime(state, nursery), conn)
        try:
            yield Frontend(backend)
        finally:
            backend.close()
            conn.close()
            nursery.cancel_scope.cancel()


class ConfigDevice(VirtioDevice):
    """Two small queues, one feature bit, and an 8-byte writable config space."""

    device_id = VirtioDeviceId.CONSOLE
    features = bit(0)

    def __init__(self) -> None:
        super().__init__()
        self.space = bytearray(b"outboard")

    @property
    def queues(self) -> Sequence[QueueSpec]:
        return (QueueSpec("rx", 16), QueueSpec("tx", 16))

    def config(self) -> bytes:
        return bytes(self.space)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.space):
            raise DeviceError(f"write of {len(data)} bytes at {offset} past the config")
        self.space[offset:offset + len(data)] = data

    def process(self, queue: SplitQueue) -> None:
        for chain in queue:
            queue.push(chain, 0)


def offer_one_chain(ram: MemfdRam, length: int = 64) -> None:
    """Put one device-writable buffer on the available ring of queue 0 (head 0)."""
    ram.write(DESC_GPA, struct.pack("<QIHH", BUFFER_GPA, length, VIRTQ_DESC_F_WRITE, 0))
    ram.write(AVAIL_GPA, struct.pack("<HHH", 0, 1, 0))


def used_idx(ram: MemfdRam) -> int:
    value: int = struct.unpack("<H", ram.read(USED_GPA + 2, 2))[0]
    return value


# -- the handler table ---------------------------------------------------------------


async def test_every_implemented_request_has_a_handler() -> None:
    async with serving() as fe:
        handled = set(fe.backend._handlers)
    assert handled == {code for code, rule in REQUESTS.items() if rule.implemented}


# -- features ------------------------------------------------------------------------


async def test_get_features_offers_protocol_features_and_version_1() -> None:
    async with serving() as fe:
        features = fe.get_u64(FrontendReq.GET_FEATURES)
    assert features >> VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert features >> Feature.VERSION_1 & 1


async def test_set_features_reaches_the_device() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate(bit(Feature.VERSION_1) | bit(0))
        assert fe.state.features == bit(Feature.VERSION_1) | bit(0)
        assert fe.state.device.driver_features == fe.state.features
        assert fe.backend.protocol_features_acked


async def test_set_features_with_bits_never_offered_is_nacked() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_FEATURES, u64(bit(Feature.VERSION_1) | bit(0)))
        assert fe.state.features == bit(Feature.VERSION_1)


async def test_set_features_with_bits_never_offered_drops_the_connection_without_reply_ack(
) -> None:
    async with serving() as fe:
        with pytest.raises(RemoteProtocolError) as info:
            fe.send(FrontendReq.SET_FEATURES, u64(bit(0)))
        assert info.value.fatal


async def test_refused_set_features_changes_nothing() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert fe.backend.protocol_features_acked
        assert not fe.acked(FrontendReq.SET_FEATURES, u64(bit(0)))
        assert fe.backend.protocol_features_acked


async def test_rings_start_disabled_with_protocol_features_and_enabled_without() -> None:
    async with serving() as fe:
        fe.send(FrontendReq.SET_FEATURES, u64(bit(Feature.VERSION_1)))
        assert all(runner.enabled for runner in fe.backend.runtime.runners)
        fe.negotiate()
        assert not any(runner.enabled for runner in fe.backend.runtime.runners)
        assert fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(0, 1)))
        assert fe.backend.runtime.runners[0].enabled


async def test_get_protocol_features_answers_what_the_connection_offers() -> None:
    async with serving() as fe:
        assert fe.get_u64(FrontendReq.GET_PROTOCOL_FEATURES) == fe.conn.offered_protocol_features


async def test_get_queue_num() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate()
        assert fe.get_u64(FrontendReq.GET_QUEUE_NUM) == 2


# -- memory --------------------------------------------------------------------------


async def test_set_mem_table_maps_the_memfd_shared(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        ram.write(5 * PAGE + 3, b"\xab\xcd")
        assert bytes(fe.backend.memory.view(5 * PAGE + 3, 2)) == b"\xab\xcd"
        fe.backend.memory.view(PAGE, 1)[0] = 0x5A
        assert ram.read(PAGE, 1) == b"\x5a"
        assert fe.backend.memory.uva_to_gpa(UVA + 7 * PAGE) == 7 * PAGE


async def test_set_mem_table_honours_the_mmap_offset(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    ram.write(PAGE + 100, b"here")
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.SET_MEM_TABLE,
                        memory_table(region(0x10_0000, PAGE, UVA, PAGE + 100)), [ram.give()])
        assert bytes(fe.backend.memory.view(0x10_0000, 4)) == b"here"


async def test_set_mem_table_replaces_the_old_table_and_closes_its_fds(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        first = ram.give()
        assert fe.acked(FrontendReq.SET_MEM_TABLE, memory_table(region(0, PAGE, UVA)), [first])
        assert fe.acked(FrontendReq.SET_MEM_TABLE,
                        memory_table(region(0x8000, PAGE, UVA), region(0x9000, PAGE, UVA + PAGE,
                                                                        PAGE)),
                        [ram.give(), ram.give()])
        assert first.closed
        assert [(r.gpa, r.size) for r in fe.backend.memory] == [(0x8000, PAGE), (0x9000, PAGE)]


async def test_region_too_small_to_map_is_refused_and_its_fd_closed(guest_ram: MakeRam) -> None:
    ram = guest_ram(PAGE)
    async with serving() as fe:
        fe.negotiate()
        fd = ram.give()
        assert not fe.acked(FrontendReq.SET_MEM_TABLE, memory_table(region(0, 2 * PAGE, UVA)),
                            [fd])
        assert fd.closed
        assert len(fe.backend.memory) == 0


async def test_failed_memory_table_releases_the_regions_mapped_before_it(
        guest_ram: MakeRam) -> None:
    ram = guest_ram(PAGE)
    async with serving() as fe:
        fe.negotiate()
        good, bad = ram.give(), ram.give()
        assert not fe.acked(FrontendReq.SET_MEM_TABLE, memory_table(
            region(0, PAGE, UVA), region(PAGE, 2 * PAGE, UVA + PAGE)), [good, bad])
        assert good.closed and bad.closed
        assert len(fe.backend.memory) == 0


async def test_overlapping_memory_table_is_refused(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fds = [ram.give(), ram.give()]
        assert not fe.acked(FrontendReq.SET_MEM_TABLE, memory_table(
            region(0, 2 * PAGE, UVA), region(PAGE, PAGE, UVA + 4 * PAGE)), fds)
        assert all(fd.closed for fd in fds)
        assert len(fe.backend.memory) == 0


async def test_refused_memory_table_keeps_the_old_one(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        assert not fe.acked(FrontendReq.SET_MEM_TABLE,
                            memory_table(region(0, 2 * ram.size, UVA)), [ram.give()])
        assert [(r.gpa, r.size) for r in fe.backend.memory] == [(0, ram.size)]
        ram.write(0, b"still")
        assert bytes(fe.backend.memory.view(0, 5)) == b"still"


async def test_add_and_remove_memory_regions(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        low, high = region(0, 4 * PAGE, UVA), region(0x10_0000, 4 * PAGE, UVA + 4 * PAGE,
                                                     4 * PAGE)
        low_fd, high_fd = ram.give(), ram.give()
        assert fe.acked(FrontendReq.ADD_MEM_REG, single_region(low), [low_fd])
        assert fe.acked(FrontendReq.ADD_MEM_REG, single_region(high), [high_fd])
        ram.write(4 * PAGE, b"high")
        assert bytes(fe.backend.memory.view(0x10_0000, 4)) == b"high"
        assert fe.backend.memory.uva_to_gpa(UVA + 4 * PAGE) == 0x10_0000

        assert fe.acked(FrontendReq.REM_MEM_REG, single_region(low))
        assert low_fd.closed and not high_fd.closed
        assert [r.gpa for r in fe.backend.memory] == [0x10_0000]
        assert not fe.acked(FrontendReq.REM_MEM_REG, single_region(low))  # gone already
    assert high_fd.closed


async def test_remove_memory_region_must_match_gpa_size_and_uva(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.ADD_MEM_REG, single_region(region(0, PAGE, UVA)),
                        [ram.give()])
        for other in (region(0, PAGE, UVA + PAGE), region(0, 2 * PAGE, UVA),
                      region(PAGE, PAGE, UVA)):
            assert not fe.acked(FrontendReq.REM_MEM_REG, single_region(other))
        assert len(fe.backend.memory) == 1


async def test_remove_memory_region_closes_an_fd_sent_with_it(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.ADD_MEM_REG, single_region(region(0, PAGE, UVA)),
                        [ram.give()])
        stray = ram.give()
        assert fe.acked(FrontendReq.REM_MEM_REG, single_region(region(0, PAGE, UVA)), [stray])
        assert stray.closed


async def test_overlapping_add_mem_reg_is_refused_and_its_fd_closed(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.ADD_MEM_REG, single_region(region(0, 8 * PAGE, UVA)),
                        [ram.give()])
        fd = ram.give()
        assert not fe.acked(FrontendReq.ADD_MEM_REG,
                            single_region(region(4 * PAGE, 8 * PAGE, UVA + 8 * PAGE)), [fd])
        assert fd.closed
        assert [(r.gpa, r.size) for r in fe.backend.memory] == [(0, 8 * PAGE)]


async def test_get_max_mem_slots() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert fe.get_u64(FrontendReq.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS


async def test_memory_requests_without_configure_mem_slots_are_refused(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate(protocol_features=1 << ProtocolFeature.REPLY_ACK)
        fd = ram.give()
        assert not fe.acked(FrontendReq.ADD_MEM_REG, single_region(region(0, PAGE, UVA)), [fd])
        assert fd.closed
        assert len(fe.backend.memory) == 0


# -- vrings --------------------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 100, 2 * RngDevice().queue_size])
async def test_set_vring_num_must_be_a_power_of_two_up_to_the_queue_size(num: int) -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_VRING_NUM, bytes(VringState(0, num)))
        assert fe.state.queues[0].size == fe.state.queues[0].max_size


async def test_set_vring_num_sets_the_size() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.SET_VRING_NUM, bytes(VringState(0, 64)))
        assert fe.state.queues[0].size == 64


async def test_vring_requests_for_a_queue_the_device_lacks_are_refused() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_VRING_NUM, bytes(VringState(1, 64)))
        assert not fe.acked(FrontendReq.SET_VRING_BASE, bytes(VringState(1, 0)))
        assert not fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(1, 1)))
        call = eventfd()
        assert not fe.acked(FrontendReq.SET_VRING_CALL, u64(1), [call])
        assert call.closed


async def test_set_vring_addr_inside_memory_sets_the_rings_up(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        fe.setup_queue()
        assert fe.state.queues[0].ready


@pytest.mark.parametrize("addresses", [
    pytest.param((UVA - PAGE, UVA + AVAIL_GPA, UVA + USED_GPA), id="descriptors-below"),
    pytest.param((UVA + DESC_GPA, UVA + 16 * PAGE, UVA + USED_GPA), id="avail-past-the-end"),
    pytest.param((UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + 16 * PAGE - 8), id="used-straddles"),
    pytest.param((DESC_GPA, AVAIL_GPA, USED_GPA), id="guest-physical-not-front-end"),
])
async def test_set_vring_addr_outside_memory_is_refused(
        guest_ram: MakeRam, addresses: tuple[int, int, int]) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        assert fe.acked(FrontendReq.SET_VRING_NUM, bytes(VringState(0, QUEUE_SIZE)))
        assert not fe.acked(FrontendReq.SET_VRING_ADDR, vring_address(0, *addresses))
        assert not fe.state.queues[0].ready


async def test_set_vring_addr_without_memory_is_refused() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_VRING_ADDR, vring_address(
            0, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA))


async def test_get_vring_base_returns_the_base_set() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.SET_VRING_BASE, bytes(VringState(0, 4242)))
        state = VringState.from_buffer_copy(
            fe.call(FrontendReq.GET_VRING_BASE, bytes(VringState(0, 0))))
        assert (state.index, state.num) == (0, 4242)


async def test_set_vring_base_past_a_split_ring_index_is_refused() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_VRING_BASE, bytes(VringState(0, 0x1_0000)))


async def test_set_vring_call_swaps_and_closes_the_old_fd() -> None:
    async with serving() as fe:
        fe.negotiate()
        first, second = eventfd(), eventfd()
        assert fe.acked(FrontendReq.SET_VRING_CALL, u64(0), [first])
        assert fe.backend.runtime.runners[0].call is first
        assert fe.acked(FrontendReq.SET_VRING_CALL, u64(0), [second])
        assert first.closed
        assert fe.acked(FrontendReq.SET_VRING_CALL, u64(VHOST_USER_VRING_NOFD_MASK))
        assert second.closed
        assert fe.backend.runtime.runners[0].call is None
        err = eventfd()
        assert fe.acked(FrontendReq.SET_VRING_ERR, u64(0), [err])
    assert err.closed


async def test_kicked_queue_is_served_and_get_vring_base_stops_it(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        fe.setup_queue()
        offer_one_chain(ram)
        call, kick = eventfd(), eventfd()
        assert fe.acked(FrontendReq.SET_VRING_CALL, u64(0), [call])
        assert fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(0, 1)))
        assert used_idx(ram) == 0  # enabled, but not started: nothing served
        assert fe.acked(FrontendReq.SET_VRING_KICK, u64(0), [kick])
        await trio.testing.wait_all_tasks_blocked()
        assert used_idx(ram) == 1  # the chain offered before the start
        assert struct.unpack("<II", ram.read(USED_GPA + 4, 8)) == (0, 64)
        assert os.eventfd_read(call.fd) == 1

        ram.write(AVAIL_GPA + 6, struct.pack("<H", 0))  # head 0 again, in ring slot 1
        ram.write(AVAIL_GPA + 2, struct.pack("<H", 2))  # then the index that offers it
        os.eventfd_write(kick.fd, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert used_idx(ram) == 2
        assert os.eventfd_read(call.fd) == 1

        state = VringState.from_buffer_copy(
            fe.call(FrontendReq.GET_VRING_BASE, bytes(VringState(0, 0))))
        assert (state.index, state.num) == (0, 2)
        assert kick.closed
        assert not fe.backend.runtime.runners[0].running


async def test_no_chain_is_taken_after_get_vring_base(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        fe.setup_queue()
        offer_one_chain(ram)
        assert fe.acked(FrontendReq.SET_VRING_KICK, u64(0), [eventfd()])
        assert fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(0, 1)))
        # No checkpoint since the kick: the queue's worker has not run yet
        # (enabling the ring may have served the chain synchronously).
        state = VringState.from_buffer_copy(
            fe.call(FrontendReq.GET_VRING_BASE, bytes(VringState(0, 0))))
        await trio.testing.wait_all_tasks_blocked()
        # The reported base still holds: nothing was taken after it was reported.
        assert fe.state.queues[0].last_avail_idx == state.num
        assert used_idx(ram) == state.num


async def test_kick_fd_replaced_before_the_worker_ran_keeps_the_queue_running(
        guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        fe.setup_queue()
        second = eventfd()
        assert fe.acked(FrontendReq.SET_VRING_KICK, u64(0), [eventfd()])
        assert fe.acked(FrontendReq.SET_VRING_KICK, u64(0), [second])
        await trio.testing.wait_all_tasks_blocked()
        assert fe.backend.runtime.runners[0].running
        offer_one_chain(ram)
        assert fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(0, 1)))
        assert used_idx(ram) == 1


async def test_queue_resized_after_its_rings_were_set_stays_in_bounds(
        guest_ram: MakeRam) -> None:
    """SET_VRING_NUM after SET_VRING_ADDR: either refused, or the rings are set up
    again at the new size; the device must never index past the ring views."""
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate(bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX))
        fe.map_ram(ram)
        fe.setup_queue()
        fe.acked(FrontendReq.SET_VRING_NUM, bytes(VringState(0, 2 * QUEUE_SIZE)))
        offer_one_chain(ram)
        assert fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(0, 1)))
        assert fe.acked(FrontendReq.SET_VRING_KICK, u64(0), [eventfd()])
        await trio.testing.wait_all_tasks_blocked()
        assert used_idx(ram) == 1
        assert not fe.state.queues[0].broken


async def test_set_vring_kick_before_the_rings_is_refused() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_VRING_KICK, u64(0), [eventfd()])
        assert not fe.backend.runtime.runners[0].running


async def test_set_vring_enable_takes_only_zero_or_one() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_VRING_ENABLE, bytes(VringState(0, 2)))
        assert not fe.backend.runtime.runners[0].enabled


async def test_memory_table_change_moves_the_rings(guest_ram: MakeRam) -> None:
    first, second = guest_ram(), guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(first)
        fe.setup_queue()
        fe.map_ram(second)  # same addresses, other memory
        offer_one_chain(second)
        assert fe.state.queues[0].available() == 1


async def test_removing_the_ring_memory_takes_the_queue_down(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.ADD_MEM_REG, single_region(region(0, ram.size, UVA)),
                        [ram.give()])
        fe.setup_queue()
        assert fe.acked(FrontendReq.REM_MEM_REG, single_region(region(0, ram.size, UVA)))
        assert not fe.state.queues[0].ready
        assert len(fe.backend.memory) == 0


# -- config and status ---------------------------------------------------------------


async def test_get_config_on_a_device_without_config_gives_an_empty_reply() -> None:
    async with serving() as fe:
        fe.negotiate()
        reply = fe.call(FrontendReq.GET_CONFIG, bytes(ConfigHeader(0, 4, 0)) + bytes(4))
        head = ConfigHeader.from_buffer_copy(reply)
        assert len(reply) == len(bytes(ConfigHeader()))
        assert (head.offset, head.size) == (0, 0)


async def test_get_config_reads_the_device_config() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate()
        reply = fe.call(FrontendReq.GET_CONFIG, bytes(ConfigHeader(3, 5, 0)) + bytes(5))
        head = ConfigHeader.from_buffer_copy(reply)
        assert (head.offset, head.size) == (3, 5)
        assert reply[len(bytes(head)):] == b"board"


async def test_get_config_past_the_device_layout_reads_zeros() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate()
        reply = fe.call(FrontendReq.GET_CONFIG, bytes(ConfigHeader(4, 8, 0)) + bytes(8))
        head = ConfigHeader.from_buffer_copy(reply)
        assert (head.offset, head.size) == (4, 8)
        assert reply[len(bytes(head)):] == b"oard" + bytes(4)


async def test_get_config_past_the_config_space_gives_an_empty_reply() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate()
        offset = MAX_CONFIG_SIZE - 4
        reply = fe.call(FrontendReq.GET_CONFIG, bytes(ConfigHeader(offset, 8, 0)) + bytes(8))
        head = ConfigHeader.from_buffer_copy(reply)
        assert len(reply) == len(bytes(head))
        assert (head.offset, head.size) == (offset, 0)


async def test_get_config_without_the_config_feature_gives_an_empty_reply() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate(protocol_features=1 << ProtocolFeature.REPLY_ACK)
        reply = fe.call(FrontendReq.GET_CONFIG, bytes(ConfigHeader(0, 8, 0)) + bytes(8))
        assert ConfigHeader.from_buffer_copy(reply).size == 0


async def test_set_config_writes_the_device_config() -> None:
    async with serving(ConfigDevice()) as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.SET_CONFIG, bytes(ConfigHeader(0, 3, 0)) + b"OUT")
        assert fe.state.device.config() == b"OUTboard"
        assert not fe.acked(FrontendReq.SET_CONFIG, bytes(ConfigHeader(6, 4, 0)) + b"tail")


async def test_set_config_on_a_read_only_config_is_refused() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert not fe.acked(FrontendReq.SET_CONFIG, bytes(ConfigHeader(0, 1, 0)) + b"x")


async def test_set_status_and_get_status() -> None:
    async with serving() as fe:
        fe.negotiate()
        steps = [DeviceStatus.ACKNOWLEDGE, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
                 DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK]
        for status in steps:
            assert fe.acked(FrontendReq.SET_STATUS, u64(status))
            assert fe.get_u64(FrontendReq.GET_STATUS) == status


async def test_features_ok_without_version_1_does_not_stick() -> None:
    async with serving() as fe:
        fe.negotiate(features=0)
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        assert fe.acked(FrontendReq.SET_STATUS, u64(status))
        assert not fe.get_u64(FrontendReq.GET_STATUS) & DeviceStatus.FEATURES_OK


async def test_set_status_clearing_bits_is_refused() -> None:
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.SET_STATUS, u64(DeviceStatus.ACKNOWLEDGE
                                                    | DeviceStatus.DRIVER))
        assert not fe.acked(FrontendReq.SET_STATUS, u64(DeviceStatus.ACKNOWLEDGE))
        assert fe.get_u64(FrontendReq.GET_STATUS) == DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER


async def test_set_status_zero_stops_but_keeps_the_ring_positions() -> None:
    # QEMU before 8.1 sends SET_STATUS 0 first and GET_VRING_BASE after it.
    async with serving() as fe:
        fe.negotiate()
        assert fe.acked(FrontendReq.SET_STATUS, u64(DeviceStatus.ACKNOWLEDGE))
        assert fe.acked(FrontendReq.SET_VRING_BASE, bytes(VringState(0, 9)))
        assert fe.acked(FrontendReq.SET_STATUS, u64(0))
        assert fe.get_u64(FrontendReq.GET_STATUS) == 0
        state = VringState.from_buffer_copy(
            fe.call(FrontendReq.GET_VRING_BASE, bytes(VringState(0, 0))))
        assert state.num == 9


async def test_reset_device_forgets_queues_and_features_but_keeps_memory(
        guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        fe.map_ram(ram)
        fe.setup_queue()
        assert fe.acked(FrontendReq.SET_VRING_BASE, bytes(VringState(0, 7)))
        call = eventfd()
        assert fe.acked(FrontendReq.SET_VRING_CALL, u64(0), [call])
        assert fe.acked(FrontendReq.SET_STATUS, u64(DeviceStatus.ACKNOWLEDGE))

        assert fe.acked(FrontendReq.RESET_DEVICE)
        queue = fe.state.queues[0]
        assert not queue.ready
        assert (queue.last_avail_idx, queue.size) == (0, queue.max_size)
        assert fe.state.features == 0
        assert fe.state.status == 0
        assert call.closed
        assert not fe.backend.runtime.runners[0].enabled  # protocol features still acked
        assert len(fe.backend.memory) == 1


# -- requests the back-end does not serve ---------------------------------------------


@pytest.mark.parametrize(("code", "rule"), rows(lambda rule: not rule.implemented))
async def test_every_unimplemented_request_is_refused(code: FrontendReq,
                                                      rule: RequestRule) -> None:
    """Nacked when the front-end can be told, else the connection is dropped."""
    async with serving() as fe:
        fe.negotiate()
        fds = fds_for(rule)
        if rule.replies:
            with pytest.raises(RemoteProtocolError) as info:
                fe.send(code, PAYLOADS[rule.payload], fds, need_reply=True)
            assert info.value.fatal
        else:
            assert not fe.acked(code, PAYLOADS[rule.payload], fds)
        assert all(fd.closed for fd in fds)


async def test_unimplemented_request_is_nacked_and_its_fd_closed() -> None:
    async with serving() as fe:
        fe.negotiate()
        fd = eventfd()
        assert not fe.acked(FrontendReq.SET_LOG_FD, b"", [fd])
        assert fd.closed


async def test_unimplemented_request_drops_the_connection_without_reply_ack() -> None:
    async with serving() as fe:
        fe.negotiate(protocol_features=0)
        fd = eventfd()
        with pytest.raises(RemoteProtocolError) as info:
            fe.send(FrontendReq.SET_LOG_FD, b"", [fd])
        assert info.value.fatal
        assert fd.closed


async def test_unimplemented_request_with_a_reply_of_its_own_drops_the_connection() -> None:
    async with serving() as fe:
        fe.negotiate()
        with pytest.raises(RemoteProtocolError) as info:
            fe.send(FrontendReq.CHECK_DEVICE_STATE, need_reply=True)
        assert info.value.fatal


# -- ownership -------------------------------------------------------------------------


async def test_close_releases_every_fd_the_backend_owns(guest_ram: MakeRam) -> None:
    ram = guest_ram()
    async with serving() as fe:
        fe.negotiate()
        memory_fd = ram.give()
        assert fe.acked(FrontendReq.SET_MEM_TABLE, memory_table(region(0, ram.size, UVA)),
                        [memory_fd])
        fe.setup_queue()
        fds = [eventfd(), eventfd(), eventfd()]
        for code, fd in zip((FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR,
                             FrontendReq.SET_VRING_KICK), fds, strict=True):
            assert fe.acked(code, u64(0), [fd])
        await trio.testing.wait_all_tasks_blocked()
        assert not any(fd.closed for fd in [memory_fd, *fds])
        fe.backend.close()
        assert all(fd.closed for fd in [memory_fd, *fds])
        assert len(fe.backend.memory) == 0
