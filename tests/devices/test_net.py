"""virtio-net over a real socket with the Python front-end."""

from __future__ import annotations

import itertools
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from outboard.backend import Feature, bit
from outboard.devices.net import (
    CtrlAck,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    Generator,
    HeaderFlag,
    Loopback,
    NetDevice,
    NetFeature,
    PcapWriter,
    Port,
    Switch,
    read_pcap,
    udp_frame,
)
from outboard.devices.net.device import finish_checksum
from outboard.devices.net.wire import CONFIG, HEADER, HEADER_SIZE
from outboard.testing import Buffer, GuestRam, VhostUserDriver, VhostUserFrontend, open_device
from outboard.transports.fdstream import FdStream
from outboard.transports.vhost_user import ProtocolFeature, serve_path

pytestmark = pytest.mark.usefixtures("fd_leak_check")

ALL = (1 << 64) - 1
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental: no stack cares


def frame(dst: bytes, src: bytes, size: int = 100, *, seed: int = 0) -> bytes:
    body = random.Random(seed).randbytes(size - 14)
    return dst + src + ETHERTYPE + body


def header(flags: int = 0, gso_type: int = 0, csum_start: int = 0, csum_offset: int = 0,
           num_buffers: int = 0) -> bytes:
    return HEADER.pack(flags, gso_type, 0, 0, csum_start, csum_offset, num_buffers)


class Recorder(Port):
    """A port that keeps what the device sends."""

    def __init__(self) -> None:
        super().__init__()
        self.packets: list[tuple[int, bytes]] = []

    def send(self, packet: memoryview, pair: int) -> None:
        self.packets.append((pair, bytes(packet)))


@dataclass
class Received:
    header: bytes
    frame: bytes
    buffers: int


@dataclass
class Nic:
    """A driver for one net device: receive buffers, transmit, control commands."""

    driver: VhostUserDriver
    pairs: int
    #: the device, when it runs in this process
    served: NetDevice | None = None
    #: receive chains offered: (pair, head) -> their buffers (gpa, size)
    rx_buffers: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def device(self) -> NetDevice:
        assert self.served is not None
        return self.served

    def deliver(self, *packets: bytes, pair: int = 0) -> None:
        """Frames from the device's port, as one burst."""
        for packet in packets:
            self.device.deliver(packet, pair)
        self.device.end_receive()

    @property
    def ctrl(self) -> int:
        return 2 * self.pairs

    @property
    def mergeable(self) -> bool:
        return bool(self.driver.features >> NetFeature.MRG_RXBUF & 1)

    def post(self, count: int, size: int = 2048, *, pair: int = 0) -> None:
        """Offer ``count`` receive buffers of ``size`` bytes."""
        ram = self.driver.ram
        for _ in range(count):
            gpa = ram.alloc(size)
            head = self.driver.offer(2 * pair, [Buffer(gpa, size, writable=True)])
            self.rx_buffers[(pair, head)] = [(gpa, size)]
        self.driver.kick(2 * pair)

    def post_chain(self, sizes: Sequence[int], *, pair: int = 0, indirect: bool = False) -> int:
        """Offer one receive chain of several descriptors; its head."""
        ram = self.driver.ram
        buffers = [Buffer(ram.alloc(size), size, writable=True) for size in sizes]
        head = self.driver.offer(2 * pair, buffers, indirect=indirect)
        self.rx_buffers[(pair, head)] = [(b.gpa, b.size) for b in buffers]
        self.driver.kick(2 * pair)
        return head

    def send(self, packet: bytes, *, pair: int = 0, split: Sequence[int] = (),
             indirect: bool = False) -> None:
        """Transmit ``packet`` (header and frame), cut at the offsets in ``split``."""
        ram = self.driver.ram
        cuts = [0, *split, len(packet)]
        buffers = []
        for start, end in itertools.pairwise(cuts):
            gpa = ram.alloc(end - start)
            ram.write(gpa, packet[start:end])
            buffers.append(Buffer(gpa, end - start))
        self.driver.offer(2 * pair + 1, buffers, indirect=indirect)
        self.driver.kick(2 * pair + 1)

    async def sent(self, count: int = 1, *, pair: int = 0) -> None:
        with trio.fail_after(10):
            used = await self.driver.wait_used(2 * pair + 1, count)
        assert all(u.written == 0 for u in used)

    async def receive(self, count: int = 1, *, pair: int = 0) -> list[Received]:
        """``count`` frames from receive queue ``pair`` (gathering merged buffers)."""
        out: list[Received] = []
        pending: list[tuple[int, int]] = []
        with trio.fail_after(10):
            while len(out) < count:
                pending += [(u.head, u.written) for u in await self.driver.wait_used(2 * pair)]
                while pending:
                    data = self._read(pair, *pending[0])
                    wanted = struct.unpack_from("<H", data, 10)[0]
                    if len(pending) < wanted:
                        break
                    for head, written in pending[1:wanted]:
                        data += self._read(pair, head, written)
                    del pending[:wanted]
                    out.append(Received(data[:HEADER_SIZE], data[HEADER_SIZE:], wanted))
        assert not pending
        return out

    def _read(self, pair: int, head: int, written: int) -> bytes:
        out = b""
        for gpa, size in self.rx_buffers.pop((pair, head)):
            take = min(size, written - len(out))
            out += self.driver.ram.read(gpa, take)
        return out

    def nothing_received(self, pair: int = 0) -> bool:
        return self.driver.queues[2 * pair].pending_used() == 0

    async def command(self, klass: int, command: int, data: bytes = b"") -> int:
        ram = self.driver.ram
        request = bytes((klass, command)) + data
        gpa = ram.alloc(len(request))
        ram.write(gpa, request)
        ack = ram.alloc(1)
        ram.write(ack, b"\xee")
        self.driver.offer(self.ctrl, [Buffer(gpa, len(request)), Buffer(ack, 1, writable=True)])
        self.driver.kick(self.ctrl)
        with trio.fail_after(10):
            (used,) = await self.driver.wait_used(self.ctrl)
        assert used.written == 1
        return ram.read(ack, 1)[0]

    async def config(self) -> tuple[bytes, int, int, int]:
        raw = await self.driver.frontend.get_config(0, CONFIG.size)
        mac, status, pairs, mtu = CONFIG.unpack(raw)
        return mac, status, pairs, mtu


@asynccontextmanager
async def serve(tmp_path: Path, devices: Sequence[NetDevice], *,
                features: int | None = None, queue_size: int = 64) -> AsyncIterator[list[Nic]]:
    """Serve ``devices`` on sockets of their own and connect a driver to each."""
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        nics = []
        for i, device in enumerate(devices):
            path = str(tmp_path / f"net{i}.sock")
            await nursery.start(serve_path, device, path)
            sizes = [queue_size] * (2 * device.queue_pairs) + [16]
            driver = await stack.enter_async_context(
                open_device(path, sizes, ram_size=8 << 20, features=features))
            nics.append(Nic(driver, device.queue_pairs, device))
        yield nics
        # Let the queue workers take their last kicks before the drivers go.
        await trio.testing.wait_all_tasks_blocked()
        await stack.aclose()
        nursery.cancel_scope.cancel()
    for device in devices:
        device.close()


@asynccontextmanager
async def one(tmp_path: Path, port: Port | None = None, *, features: int | None = None,
              **options: object) -> AsyncIterator[Nic]:
    device = NetDevice(port or Port(), mac=MAC_A, config_space=True,
                       **options)  # type: ignore[arg-type]
    async with serve(tmp_path, [device], features=features) as (nic,):
        yield nic


# -- negotiation and config --------------------------------------------------


async def test_features_config_and_queue_count(tmp_path: Path) -> None:
    async with one(tmp_path, Loopback(), queue_pairs=2, mtu=9000) as nic:
        f = nic.driver.features
        for feature in (NetFeature.MAC, NetFeature.STATUS, NetFeature.MRG_RXBUF,
                        NetFeature.MTU, NetFeature.CTRL_VQ, NetFeature.CTRL_RX,
                        NetFeature.CTRL_MAC_ADDR, NetFeature.MQ, NetFeature.CSUM,
                        NetFeature.GUEST_CSUM):
            assert f >> feature & 1, feature.name
        for feature in (Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC):
            assert f & bit(feature), feature.name
        assert not f >> NetFeature.HOST_TSO4 & 1  # a loopback cannot segment
        assert await nic.config() == (MAC_A, 1, 2, 9000)
        assert await nic.driver.frontend.get_queue_num() == 5


async def test_no_config_space_unless_asked(tmp_path: Path) -> None:
    device = NetDevice(Loopback(), mac=MAC_A)
    async with serve(tmp_path, [device]) as (nic,):
        assert not nic.driver.frontend.protocol_features >> ProtocolFeature.CONFIG & 1
        assert device.config() == b""
        assert CONFIG.unpack(device.config_layout())[0] == MAC_A


async def test_one_pair_offers_no_mq(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        assert not nic.driver.features >> NetFeature.MQ & 1
        assert (await nic.config())[2] == 1


# -- transmit ----------------------------------------------------------------


@pytest.mark.parametrize("shape", ["one", "header-apart", "many", "indirect"])
async def test_tx_frames_arrive_intact(tmp_path: Path, shape: str) -> None:
    recorder = Recorder()
    async with one(tmp_path, recorder) as nic:
        sizes = [60, 64, 100, 512, 1514, 1518]
        packets = [header() + frame(MAC_B, MAC_A, size, seed=size) for size in sizes]
        for packet in packets:
            split = {"one": (), "header-apart": (HEADER_SIZE,),
                     "many": (HEADER_SIZE, 20, 40), "indirect": (HEADER_SIZE, 30)}[shape]
            nic.send(packet, split=split, indirect=shape == "indirect")
        await nic.sent(len(packets))
    assert recorder.packets == [(0, p) for p in packets]
    assert nic.device.stats.tx_packets == len(packets)
    assert nic.device.stats.tx_bytes == sum(sizes)


async def test_tx_over_mtu_and_runts_are_dropped_and_counted(tmp_path: Path) -> None:
    recorder = Recorder()
    async with one(tmp_path, recorder, mtu=1000) as nic:
        fits = header() + frame(MAC_B, MAC_A, 1000 + 18)
        too_long = header() + frame(MAC_B, MAC_A, 1000 + 19)
        runt = header() + MAC_B + MAC_A
        for packet in (too_long, runt, fits):
            nic.send(packet)
        await nic.sent(3)
        stats = nic.device.stats
        assert (stats.tx_oversize, stats.tx_errors, stats.tx_packets) == (1, 1, 1)
    assert recorder.packets == [(0, fits)]


async def test_tx_queues_of_each_pair(tmp_path: Path) -> None:
    recorder = Recorder()
    async with one(tmp_path, recorder, queue_pairs=3) as nic:
        for pair in range(3):
            nic.send(header() + frame(MAC_B, MAC_A, seed=pair), pair=pair)
            await nic.sent(pair=pair)
    assert [pair for pair, _ in recorder.packets] == [0, 1, 2]


# -- receive -----------------------------------------------------------------


async def test_rx_frame_with_header(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        nic.post(4)
        packets = [header() + frame(MAC_A, MAC_B, size, seed=size) for size in (60, 1514)]
        nic.deliver(*packets)
        got = await nic.receive(2)
    for received, packet in zip(got, packets, strict=True):
        assert received.frame == packet[HEADER_SIZE:]
        assert received.header == header(num_buffers=1)
        assert received.buffers == 1
    assert nic.device.stats.rx_packets == 2


async def test_loopback_returns_what_is_sent(tmp_path: Path) -> None:
    async with one(tmp_path, Loopback()) as nic:
        nic.post(8)
        packets = [header() + frame(MAC_A, MAC_B, size, seed=size) for size in (60, 700, 1514)]
        for packet in packets:
            nic.send(packet)
        await nic.sent(3)
        got = await nic.receive(3)
    assert [r.frame for r in got] == [p[HEADER_SIZE:] for p in packets]


async def test_loopback_holds_frames_while_the_receive_ring_is_full(tmp_path: Path) -> None:
    async with one(tmp_path, Loopback()) as nic:
        nic.post(2)
        packets = [header() + frame(MAC_A, MAC_B, seed=i) for i in range(5)]
        for packet in packets:
            nic.send(packet)
        got = await nic.receive(2)
        await nic.sent(2)
        assert nic.driver.queues[1].pending_used() == 0  # three wait in the ring
        nic.post(3)
        got += await nic.receive(3)
        await nic.sent(3)
    assert [r.frame for r in got] == [p[HEADER_SIZE:] for p in packets]
    assert nic.device.stats.rx_ring_full == 0


async def test_loopback_burst_mixes_straight_and_general_receive_paths(tmp_path: Path) -> None:
    """One transmit burst: frames into one-descriptor buffers (the straight
    path), into a chain of two (the general path), one over the MTU (dropped on
    transmit), and more than the buffers left (held until new buffers come)."""
    async with one(tmp_path, Loopback(), mtu=1500) as nic:
        nic.post(1)
        nic.post_chain([HEADER_SIZE, 1000])
        nic.post(1)
        sizes = (60, 700, 2000, 1514, 100, 200)
        packets = [header() + frame(MAC_A, MAC_B, size, seed=size) for size in sizes]
        for packet in packets:  # no checkpoint in between: one burst
            nic.send(packet)
        got = await nic.receive(3)
        await trio.testing.wait_all_tasks_blocked()
        assert nic.driver.queues[1].pending_used() == 4  # three sent, one dropped
        nic.post(2)
        got += await nic.receive(2)
        await nic.sent(2)
    expected = [p[HEADER_SIZE:] for p in packets if len(p) - HEADER_SIZE <= 1514]
    assert [r.frame for r in got] == expected
    stats = nic.device.stats
    assert (stats.tx_oversize, stats.rx_ring_full, stats.rx_packets) == (1, 0, 5)


async def test_loopback_holds_frames_until_the_receive_queue_runs(tmp_path: Path) -> None:
    async with one(tmp_path, Loopback()) as nic:
        await nic.driver.frontend.set_vring_enable(0, False)
        nic.send(header() + frame(MAC_A, MAC_B))
        await trio.testing.wait_all_tasks_blocked()
        assert nic.driver.queues[1].pending_used() == 0
        await nic.driver.frontend.set_vring_enable(0, True)
        nic.post(1)
        (got,) = await nic.receive()
        await nic.sent()
    assert got.frame == frame(MAC_A, MAC_B)
    assert nic.device.stats.rx_no_queue == 0


async def test_mergeable_rx_spans_several_small_buffers(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        assert nic.mergeable
        nic.post(16, 64)
        packet = header() + frame(MAC_A, MAC_B, 300)
        nic.deliver(packet)
        (got,) = await nic.receive()
        assert got.buffers == 5  # 312 bytes in 64-byte buffers
        assert got.header == header(num_buffers=5)
        assert got.frame == packet[HEADER_SIZE:]
        # The next frame starts in the next free buffer.
        small = header() + frame(MAC_A, MAC_B, 50)
        nic.deliver(small)
        (got,) = await nic.receive()
        assert got.buffers == 1 and got.frame == small[HEADER_SIZE:]


async def test_mergeable_frame_larger_than_the_ring_is_dropped(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        nic.post(3, 64)
        nic.deliver(header() + frame(MAC_A, MAC_B, 300))
        assert nic.device.stats.rx_ring_full == 1
        assert nic.nothing_received()
        fits = header() + frame(MAC_A, MAC_B, 150)
        nic.deliver(fits)
        (got,) = await nic.receive()
        assert got.buffers == 3 and got.frame == fits[HEADER_SIZE:]


async def test_too_small_buffer_without_mrg_drops_and_counts(tmp_path: Path) -> None:
    want = ALL & ~bit(NetFeature.MRG_RXBUF)
    async with one(tmp_path, features=want) as nic:
        assert not nic.mergeable
        nic.post(2, 128)
        nic.deliver(header() + frame(MAC_A, MAC_B, 200))
        assert nic.device.stats.rx_too_small == 1
        assert nic.nothing_received()
        fits = header() + frame(MAC_A, MAC_B, 116)
        nic.deliver(fits)
        (got,) = await nic.receive()
        # Without MRG_RXBUF num_buffers still reads 1 (virtio 1.2, 5.1.6.4).
        assert got.header == header(num_buffers=1) and got.frame == fits[HEADER_SIZE:]


async def test_over_mtu_rx_frames_are_dropped_and_counted(tmp_path: Path) -> None:
    async with one(tmp_path, mtu=576) as nic:
        nic.post(4)
        nic.deliver(header() + frame(MAC_A, MAC_B, 576 + 19),
                    header() + frame(MAC_A, MAC_B, 576 + 18))
        (got,) = await nic.receive()
        assert len(got.frame) == 576 + 18
        assert nic.device.stats.rx_oversize == 1


async def test_full_ring_drops_and_counts(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        nic.post(2)
        for i in range(5):
            nic.deliver(header() + frame(MAC_A, MAC_B, seed=i))
        got = await nic.receive(2)
        assert [r.frame for r in got] == [frame(MAC_A, MAC_B, seed=i) for i in (0, 1)]
        assert nic.device.stats.rx_ring_full == 3
        # Nothing else broke: new buffers take new frames.
        nic.post(1)
        nic.deliver(header() + frame(MAC_A, MAC_B, seed=9))
        (got9,) = await nic.receive()
        assert got9.frame == frame(MAC_A, MAC_B, seed=9)


async def test_frames_without_a_running_queue_are_counted(tmp_path: Path) -> None:
    device = NetDevice(Port())
    device.deliver(header() + frame(MAC_A, MAC_B))
    assert device.stats.rx_no_queue == 1
    device.close()


@pytest.mark.parametrize("indirect", [False, True])
async def test_rx_chains_of_several_descriptors(tmp_path: Path, indirect: bool) -> None:
    async with one(tmp_path) as nic:
        nic.post_chain([HEADER_SIZE, 40, 2000], indirect=indirect)
        nic.post_chain([6, 100], indirect=indirect)
        nic.post_chain([6, 100], indirect=indirect)
        big = header() + frame(MAC_A, MAC_B, 1000)
        spread = header() + frame(MAC_A, MAC_B, 150)  # 162 bytes: two chains of 106
        nic.deliver(big, spread)
        first, second = await nic.receive(2)
    assert (first.buffers, first.frame) == (1, big[HEADER_SIZE:])
    assert (second.buffers, second.frame) == (2, spread[HEADER_SIZE:])
    assert second.header == header(num_buffers=2)


async def test_checksum_passes_to_a_driver_with_guest_csum(tmp_path: Path) -> None:
    async with one(tmp_path, Loopback()) as nic:
        nic.post(2)
        packet = _partial_udp()
        nic.deliver(packet)
        (got,) = await nic.receive()
        assert got.header[0] == HeaderFlag.NEEDS_CSUM
        assert got.frame == packet[HEADER_SIZE:]


async def test_checksum_finished_for_a_driver_without_guest_csum(tmp_path: Path) -> None:
    want = ALL & ~bit(NetFeature.GUEST_CSUM)
    async with one(tmp_path, Loopback(), features=want) as nic:
        nic.post(2)
        nic.deliver(_partial_udp())
        (got,) = await nic.receive()
    assert got.header == header(num_buffers=1)
    assert _udp_checksum_ok(got.frame)


def _partial_udp() -> bytes:
    """A UDP frame whose checksum is left to the device (the pseudo-header sum in
    its checksum field), with the header that says so."""
    data = bytearray(udp_frame(200, dst=MAC_A, src=MAC_B))
    src, dst = data[26:30], data[30:34]
    length = len(data) - 34
    pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
    total = int.from_bytes(pseudo, "big") % 0xFFFF
    struct.pack_into("!H", data, 40, total)
    return header(HeaderFlag.NEEDS_CSUM, csum_start=34, csum_offset=6) + bytes(data)


def _udp_checksum_ok(data: bytes) -> bool:
    src, dst = data[26:30], data[30:34]
    udp = data[34:]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    whole = pseudo + udp + (b"\0" if len(udp) & 1 else b"")
    return int.from_bytes(whole, "big") % 0xFFFF == 0


def test_finish_checksum_matches_a_full_computation() -> None:
    finished = finish_checksum(_partial_udp())
    assert finished[0] == 0
    assert _udp_checksum_ok(bytes(finished[HEADER_SIZE:]))


# -- the control queue -------------------------------------------------------


async def test_control_mq_pairs_set(tmp_path: Path) -> None:
    async with one(tmp_path, queue_pairs=2) as nic:
        pairs = struct.Struct("<H").pack
        assert await nic.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, pairs(0)) == CtrlAck.ERR
        assert await nic.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, pairs(3)) == CtrlAck.ERR
        assert await nic.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, b"\x02") == CtrlAck.ERR
        # One pair until the driver asks for more: a frame from pair 1 lands on rx0.
        nic.post(2, pair=0)
        nic.post(2, pair=1)
        nic.deliver(header() + frame(MAC_A, MAC_B, seed=1), pair=1)
        await nic.receive(pair=0)
        assert await nic.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, pairs(2)) == CtrlAck.OK
        assert nic.device.active_pairs == 2
        nic.deliver(header() + frame(MAC_A, MAC_B, seed=2), pair=1)
        (got,) = await nic.receive(pair=1)
        assert got.frame == frame(MAC_A, MAC_B, seed=2)
        assert nic.nothing_received(0)


async def test_control_mac_addr_set(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        new = bytes.fromhex("02aabbccddee")
        assert await nic.command(CtrlClass.MAC, CtrlMac.ADDR_SET, new) == CtrlAck.OK
        assert (await nic.config())[0] == new
        assert await nic.command(CtrlClass.MAC, CtrlMac.ADDR_SET, new[:5]) == CtrlAck.ERR


async def test_control_promisc_and_mac_table_filter(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        nic.post(8)
        other = bytes.fromhex("02ffffff0001")
        listed = bytes.fromhex("02ffffff0002")
        assert await nic.command(CtrlClass.RX, CtrlRx.PROMISC, b"\x00") == CtrlAck.OK
        assert await nic.command(CtrlClass.RX, CtrlRx.ALLMULTI, b"\x00") == CtrlAck.OK
        table = struct.pack("<I", 1) + listed + struct.pack("<I", 0)
        assert await nic.command(CtrlClass.MAC, CtrlMac.TABLE_SET, table) == CtrlAck.OK
        for dst in (other, MAC_A, BROADCAST, listed, bytes.fromhex("01005e000001")):
            nic.deliver(header() + frame(dst, MAC_B))
        got = await nic.receive(3)
        assert [r.frame[:6] for r in got] == [MAC_A, BROADCAST, listed]
        assert nic.device.stats.rx_filtered == 2
        assert await nic.command(CtrlClass.RX, CtrlRx.PROMISC, b"\x01") == CtrlAck.OK
        nic.deliver(header() + frame(other, MAC_B))
        (got_other,) = await nic.receive()
        assert got_other.frame[:6] == other


async def test_control_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    async with one(tmp_path) as nic:
        assert await nic.command(CtrlClass.RX, CtrlRx.NOBCAST, b"\x01") == CtrlAck.ERR
        assert await nic.command(CtrlClass.RX, CtrlRx.PROMISC, b"") == CtrlAck.ERR
        assert await nic.command(CtrlClass.VLAN, 0, b"\x01\x00") == CtrlAck.ERR
        assert await nic.command(99, 0) == CtrlAck.ERR
        # MQ was not offered for one pair.
        assert await nic.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, b"\x01\x00") == CtrlAck.ERR
        bad_table = struct.pack("<I", 5) + MAC_B
        assert await nic.command(CtrlClass.MAC, CtrlMac.TABLE_SET, bad_table) == CtrlAck.ERR


# -- the switch ---------------------------------------------------------------


async def test_switch_learns_floods_and_forwards(tmp_path: Path) -> None:
    switch = Switch("sw0")
    devices = [NetDevice(switch.port(), mac=mac) for mac in (MAC_A, MAC_B, MAC_C)]
    async with serve(tmp_path, devices) as (a, b, c):
        for nic in (a, b, c):
            nic.post(8)
        # Unknown unicast from A: flooded to B and C; A's address is learnt.
        a.send(header() + frame(MAC_B, MAC_A, seed=1))
        await a.sent()
        for nic in (b, c):
            (got,) = await nic.receive()
            assert got.frame == frame(MAC_B, MAC_A, seed=1)
        assert switch.table == {MAC_A: switch.ports[0]}
        # B answers A: A is known, so only A gets it.
        b.send(header() + frame(MAC_A, MAC_B, seed=2))
        await b.sent()
        (got,) = await a.receive()
        assert got.frame == frame(MAC_A, MAC_B, seed=2)
        assert c.nothing_received()
        # Broadcast from C: A and B.
        c.send(header() + frame(BROADCAST, MAC_C, seed=3))
        await c.sent()
        for nic in (a, b):
            (got,) = await nic.receive()
            assert got.frame == frame(BROADCAST, MAC_C, seed=3)
        assert set(switch.table) == {MAC_A, MAC_B, MAC_C}
        # A frame to its own sender's port goes nowhere.
        a.send(header() + frame(MAC_A, MAC_A, seed=4))
        await a.sent()
        assert a.nothing_received() and b.nothing_received() and c.nothing_received()
        assert (switch.forwarded, switch.flooded) == (1, 2)


async def test_switch_drops_and_counts_for_a_full_ring(tmp_path: Path) -> None:
    switch = Switch()
    devices = [NetDevice(switch.port(), mac=mac) for mac in (MAC_A, MAC_B)]
    async with serve(tmp_path, devices) as (a, b):
        b.post(1)
        for i in range(3):
            a.send(header() + frame(MAC_B, MAC_A, seed=i))
        await a.sent(3)
        (got,) = await b.receive()
        assert got.frame == frame(MAC_B, MAC_A, seed=0)
        assert b.device.stats.rx_ring_full == 2
        assert a.device.stats.tx_packets == 3


async def test_switch_finishes_checksums_for_a_peer_without_guest_csum(tmp_path: Path) -> None:
    switch = Switch()
    devices = [NetDevice(switch.port(), mac=mac) for mac in (MAC_A, MAC_B)]
    want = ALL & ~bit(NetFeature.GUEST_CSUM)
    async with serve(tmp_path, devices, features=want) as (a, b):
        a.post(2)
        b.send(_partial_udp())
        await b.sent()
        (got,) = await a.receive()
    assert got.header[0] == 0 and _udp_checksum_ok(got.frame)


# -- capture ------------------------------------------------------------------


async def test_capture_records_both_directions(tmp_path: Path) -> None:
    path = str(tmp_path / "cap.pcap")
    async with one(tmp_path, Loopback(), capture=PcapWriter(path)) as nic:
        nic.post(4)
        sent = [frame(MAC_A, MAC_B, size, seed=size) for size in (60, 1514)]
        for f in sent:
            nic.send(header() + f)
        await nic.sent(2)
        await nic.receive(2)
    records = list(read_pcap(path))
    # Loopback: each frame leaves (tx) and comes back (rx).
    assert [r.data for r in records] == [sent[0], sent[0], sent[1], sent[1]]
    assert all(r.original_length == len(r.data) for r in records)


def test_pcap_header_is_classic_ethernet(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    writer = PcapWriter(str(path))
    writer.write(b"\x01" * 60)
    writer.write(memoryview(b"\x02" * 10), memoryview(b"\x03" * 10))
    writer.close()
    raw = path.read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("=IHHiIII", raw)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    assert snaplen >= 65535
    assert [r.data for r in read_pcap(str(path))] == [b"\x01" * 60, b"\x02" * 10 + b"\x03" * 10]


# -- the generator --------------------------------------------------------------


async def test_generator_fills_every_buffer(tmp_path: Path) -> None:
    async with one(tmp_path, Generator(64)) as nic:
        nic.post(10)
        got = await nic.receive(10)
        nic.post_chain([HEADER_SIZE, 100])  # not one descriptor: the general path
        nic.post(2)
        got += await nic.receive(3)
    assert all(r.frame == udp_frame(64) and r.buffers == 1 for r in got)
    assert nic.device.stats.rx_packets == 13


def test_udp_frame_is_well_formed() -> None:
    data = udp_frame(100)
    assert len(data) == 100 and data[12:14] == b"\x08\x00"
    assert int.from_bytes(data[14:34], "big") % 0xFFFF == 0  # the IP header checksum
    assert struct.unpack("!H", data[16:18])[0] == 86
    with pytest.raises(ValueError):
        udp_frame(41)


# -- the command line -------------------------------------------------------------


def test_cli_serves_several_devices_on_one_switch(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{name}.sock") for name in "ab"]
    argv = [sys.executable, "-m", "outboard", "net", "--switch", "sw0", "--config-space",
            "--mac", "02:00:00:00:00:0a", "--socket-path", paths[0], "--socket-path", paths[1]]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        async def exchange() -> tuple[bytes, bytes, Received]:
            with trio.fail_after(10):
                while not all(os.path.exists(p) for p in paths):
                    await trio.sleep(0.05)
            async with open_device(paths[0], [64, 64, 16], ram_size=4 << 20) as da, \
                    open_device(paths[1], [64, 64, 16], ram_size=4 << 20) as db:
                a, b = Nic(da, 1), Nic(db, 1)
                mac_a, mac_b = (await a.config())[0], (await b.config())[0]
                b.post(2)
                a.send(header() + frame(BROADCAST, mac_a))
                await a.sent()
                (got,) = await b.receive()
                return mac_a, mac_b, got

        mac_a, mac_b, got = trio.run(exchange)
        assert (mac_a.hex(), mac_b.hex()) == ("02000000000a", "02000000000b")
        assert got.frame == frame(BROADCAST, mac_a)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("mode", ["fd", "connect"])
def test_cli_serves_one_device_on_an_fd_or_by_connecting(tmp_path: Path, mode: str) -> None:
    path = str(tmp_path / "net.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    argv = [sys.executable, "-m", "outboard", "net", "--loopback", "--config-space",
            "--mac", "02:00:00:00:00:0c"]
    if mode == "fd":
        proc = subprocess.Popen([*argv, "--fd", str(listener.fileno())],
                                pass_fds=[listener.fileno()], stderr=subprocess.PIPE, text=True)
        listener.close()
    else:
        listener.close()
        os.unlink(path)
        proc = subprocess.Popen([*argv, "--connect", path], stderr=subprocess.PIPE, text=True)

    async def round_trip() -> tuple[bytes, Received]:
        if mode == "connect":
            # The VMM listens (QEMU's server=on): the back-end connects to us.
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                await server.bind(path)
                server.listen(1)
                with trio.fail_after(10):
                    conn, _ = await server.accept()
            stream = FdStream(conn)
            fe = VhostUserFrontend(stream)
            ram = GuestRam(4 << 20)
            try:
                async with fe:
                    driver = VhostUserDriver(fe, ram)
                    try:
                        await driver.negotiate()
                        await driver.start([64, 64, 16])
                        return await _loop_once(Nic(driver, 1))
                    finally:
                        driver.close()
            finally:
                ram.close()
        async with open_device(path, [64, 64, 16], ram_size=4 << 20) as driver:
            return await _loop_once(Nic(driver, 1))

    try:
        mac, got = trio.run(round_trip)
        assert mac == bytes.fromhex("02000000000c")
        assert got.frame == frame(BROADCAST, MAC_B)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


async def _loop_once(nic: Nic) -> tuple[bytes, Received]:
    mac = (await nic.config())[0]
    nic.post(1)
    nic.send(header() + frame(BROADCAST, MAC_B))
    await nic.sent()
    (got,) = await nic.receive()
    return mac, got


def test_cli_refuses_several_sockets_for_one_device_kinds(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "outboard", "rng", "--socket-path", "a",
                             "--socket-path", "b"], capture_output=True, text=True)
    assert result.returncode == 2 and "give --socket-path once" in result.stderr
    result = subprocess.run([sys.executable, "-m", "outboard", "net", "--socket-path", "a"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "--tap, --switch" in result.stderr


def test_mac_parsing() -> None:
    from outboard.devices.net import format_mac, parse_mac

    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert format_mac(bytes.fromhex("525400123456")) == "52:54:00:12:34:56"
    for bad in ("52:54:00:12:34", "01:00:00:00:00:00", "zz:00:00:00:00:00", "123:4:5:6:7:8"):
        with pytest.raises(ValueError):
            parse_mac(bad)
