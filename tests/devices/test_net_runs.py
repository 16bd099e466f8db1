"""The net rings' runs of consecutive descriptors, against frame by frame.

``TxRing._run`` and ``RxRing._put_runs`` read a run of descriptors in one
unpack and check it as a whole; anything they do not take goes frame by frame.
Whatever the driver puts in its rings (descriptors in and out of order, heads
past the table, buffers straddling memory or in another region, wrong flags,
small buffers, runts, over-MTU frames, partial checksums, a full receive
ring), both ways must leave the same guest memory, used entries and counters.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outboard.backend import Feature, GuestMemory, MemoryRegion, SplitQueue, bit
from outboard.backend.memory import RegionSpec
from outboard.devices.net import Loopback, NetDevice, NetFeature, Port, udp_frame
from outboard.devices.net import device as net_device
from outboard.devices.net import ring as net_ring
from outboard.devices.net.wire import HEADER_SIZE
from outboard.testing import DriverQueue, GuestRam

RAM_SIZE = 1 << 20
HALF = RAM_SIZE // 2
HIGH_GPA = 1 << 32  # where the second region starts
RING = 16
SLOT = 2048  # bytes per buffer slot
NEXT, WRITE, INDIRECT = 1, 2, 4
#: the device's MTU: frames of up to 1514 + 4 bytes pass, longer ones are dropped
MTU = 1500

_desc = struct.Struct("<QIHH")


@dataclass(frozen=True)
class Buf:
    """One descriptor the driver offers: where its buffer lies and what it says."""

    #: None: descriptor i in slot i (as DPDK does); else this head (may be past the table)
    head: int | None = None
    #: "low", "high" (the second region), "straddle" (over the end of the low
    #: region), "outside" (no region)
    where: str = "low"
    size: int = 2048
    flags: int = WRITE
    #: transmit only: the header asks for a partial checksum
    csum: bool = False
    #: transmit only: the header says TCPv4 segmentation offload
    gso: bool = False


def rx_bufs() -> st.SearchStrategy[Buf]:
    """Mostly what a driver offers; now and then something wrong, in one way."""
    good = Buf()
    return st.one_of(
        st.just(good), st.just(good), st.just(good),
        st.builds(Buf, head=st.integers(0, RING + 1)),
        st.builds(Buf, where=st.sampled_from(["high", "high", "straddle", "outside"])),
        st.builds(Buf, size=st.sampled_from([100, 40, 8])),
        st.builds(Buf, flags=st.sampled_from([0, WRITE | NEXT, INDIRECT])))


def tx_bufs() -> st.SearchStrategy[Buf]:
    good = Buf(size=HEADER_SIZE + 64, flags=0)
    return st.one_of(
        st.just(good), st.just(good), st.just(good),
        st.builds(Buf, head=st.integers(0, RING + 1), size=st.just(good.size),
                  flags=st.just(0)),
        st.builds(Buf, where=st.sampled_from(["high", "high", "straddle", "outside"]),
                  size=st.just(good.size), flags=st.just(0)),
        st.builds(Buf, size=st.sampled_from([HEADER_SIZE + 1514, HEADER_SIZE + 1600,
                                             HEADER_SIZE + 10, 8]), flags=st.just(0)),
        st.builds(Buf, size=st.just(good.size), flags=st.sampled_from([WRITE, NEXT, INDIRECT])),
        st.builds(Buf, size=st.just(good.size), flags=st.just(0), csum=st.just(True)),
        st.builds(Buf, size=st.sampled_from([HEADER_SIZE + 1600, HEADER_SIZE + 1900]),
                  flags=st.just(0), gso=st.just(True)))


#: one round: receive buffers offered, then packets to transmit
Round = tuple[list[Buf], list[Buf]]
RX = Buf()
TX = Buf(size=HEADER_SIZE + 64, flags=0)


class Rig:
    """A net device on the loopback port, its two rings in guest RAM of two
    regions, driven the way a driver would."""

    def __init__(self, *, mergeable: bool, guest_csum: bool, drift: int = 0,
                 gso: bool = False, port: Port | None = None) -> None:
        self.ram = GuestRam(RAM_SIZE)
        buf = self.ram._map
        memory = GuestMemory([
            MemoryRegion.from_buffer(RegionSpec(0, HALF, 0x1000_0000, 0), buf),
            MemoryRegion.from_buffer(RegionSpec(HIGH_GPA, HALF, 0x2000_0000, HALF), buf),
        ])
        self.device = NetDevice(port or Loopback(), queue_size=RING, mtu=MTU)
        self.drivers = [DriverQueue(self.ram, RING) for _ in range(2)]
        self.queues = [SplitQueue(i, RING) for i in range(3)]
        for queue, driver in zip(self.queues, self.drivers, strict=False):
            queue.set_features(event_idx=False, indirect=True)
            queue.setup(memory, driver.desc_gpa, driver.avail_gpa, driver.used_gpa)
            queue.notifier = lambda: None
            # Used entries this far ahead of the available ones they answer (as
            # after a reconnection with requests in flight).
            queue.used_idx = drift
        self.device.bind(self.queues)
        features = bit(Feature.VERSION_1) | bit(NetFeature.CSUM)
        if mergeable:
            features |= bit(NetFeature.MRG_RXBUF)
        if guest_csum:
            features |= bit(NetFeature.GUEST_CSUM)
        if gso:
            # As a port with segmentation offload offers (a tap, say).
            tso = bit(NetFeature.HOST_TSO4) | bit(NetFeature.GUEST_TSO4)
            self.device.features |= tso
            features |= tso
        self.device.activate(features)
        # Buffer slots from an eighth up (low) and from the half up (high),
        # handed out in turn so every buffer of a run has bytes of its own.
        self._low = iter(range(RAM_SIZE // 8, HALF - SLOT, SLOT))
        self._high = iter(range(HALF, RAM_SIZE - SLOT, SLOT))
        self.rng = random.Random(7)

    def close(self) -> None:
        self.device.close()
        self.ram.close()

    def _place(self, b: Buf, content: bytes) -> int:
        """The guest address of a new buffer holding ``content``."""
        if b.where == "straddle":
            return HALF - b.size // 2
        if b.where == "outside":
            return HIGH_GPA + HALF + 4096
        offset = next(self._low if b.where == "low" else self._high)
        self.ram.write(offset, content)
        return offset + (HIGH_GPA - HALF if b.where == "high" else 0)

    def _offer(self, driver: DriverQueue, b: Buf, content: bytes) -> None:
        head = driver.avail_idx % RING if b.head is None else b.head
        if head < RING:
            driver.write_desc(head, self._place(b, content), b.size, b.flags, (head + 1) % RING)
        driver._avail_h[2 + driver.avail_idx % RING] = head
        driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF

    def _packet(self, b: Buf) -> bytes:
        header = bytearray(self.rng.randbytes(HEADER_SIZE))
        header[0] = 1 if b.csum else 0  # NEEDS_CSUM
        header[1] = 1 if b.gso else 0  # TCPv4 segmentation offload, or none
        header[6:10] = struct.pack("<HH", 34, 6)  # a UDP checksum after an IPv4 header
        n = b.size - HEADER_SIZE
        frame = udp_frame(n) if n >= 60 else self.rng.randbytes(max(n, 0))
        return (bytes(header) + frame)[:b.size]

    def run(self, rounds: list[Round]) -> None:
        rx_driver, tx_driver = self.drivers
        rx_queue, tx_queue = self.queues[0], self.queues[1]
        for rx, tx in rounds:
            for b in rx:
                self._offer(rx_driver, b, bytes([0xEE]) * min(b.size, SLOT))
            rx_driver.publish()
            self.device.process(rx_queue)
            rx_queue.publish()
            for b in tx:
                self._offer(tx_driver, b, self._packet(b)[:SLOT])
            tx_driver.publish()
            self.device.process(tx_queue)
            tx_queue.publish()

    def deliver(self, rounds: list[tuple[list[Buf], list[Buf]]]) -> None:
        """Rounds of receive buffers, then packets from outside (a switch, say)
        delivered in one burst."""
        rx_driver = self.drivers[0]
        for rx, packets in rounds:
            for b in rx:
                self._offer(rx_driver, b, bytes([0xEE]) * min(b.size, SLOT))
            rx_driver.publish()
            burst = [memoryview(bytearray(self._packet(b))) for b in packets]
            self.device.deliver_burst(burst)
            self.device.end_receive()

    def fill(self, rounds: list[tuple[list[Buf], int]]) -> None:
        """Rounds of receive buffers, then a traffic source's frame of the given
        size copied into every one of them."""
        rx_driver = self.drivers[0]
        for rx, size in rounds:
            for b in rx:
                self._offer(rx_driver, b, bytes([0xEE]) * min(b.size, SLOT))
            rx_driver.publish()
            self.device.fill(0, bytes(10) + b"\x01\x00" + udp_frame(size))
            self.device.end_receive()

    def outcome(self) -> tuple[object, ...]:
        return (bytes(self.ram._map), self.device.stats.as_dict(),
                [(q.last_avail_idx, q.used_idx, q.broken) for q in self.queues])


def _outcome(rounds: list[Any], *, mergeable: bool, guest_csum: bool, drift: int,
             gso: bool, how: str = "loopback") -> tuple[object, ...]:
    # A traffic source drops what finds no buffer; the loopback holds it.
    port = Port() if how == "fill" else Loopback()
    rig = Rig(mergeable=mergeable, guest_csum=guest_csum, drift=drift, gso=gso, port=port)
    try:
        {"loopback": rig.run, "deliver": rig.deliver, "fill": rig.fill}[how](rounds)
        return rig.outcome()
    finally:
        rig.close()


def _both(rounds: list[Any], run_max: int,
          **options: Any) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """The outcome with runs of up to ``run_max``, and with every frame one at a time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(net_ring, "RUN_MAX", run_max)
        runs = _outcome(rounds, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(net_ring, "consecutive", lambda avail, start, k, size: -1)
        each = _outcome(rounds, **options)
    return runs, each


#: runs as long as they come, and runs cut short (several per burst)
run_maxes = st.sampled_from([net_ring.RUN_MAX, 3])


@settings(max_examples=300, deadline=None)
@given(rounds=st.lists(st.tuples(st.lists(rx_bufs(), max_size=RING),
                                 st.lists(tx_bufs(), max_size=RING)), min_size=1, max_size=4),
       mergeable=st.booleans(), guest_csum=st.booleans(), drift=st.sampled_from([0, 0, 5]),
       gso=st.booleans(), run_max=run_maxes)
def test_runs_do_what_frame_by_frame_does(rounds: list[Round], mergeable: bool,
                                          guest_csum: bool, drift: int, gso: bool,
                                          run_max: int) -> None:
    runs, each = _both(rounds, run_max, mergeable=mergeable, guest_csum=guest_csum,
                       drift=drift, gso=gso)
    assert runs == each


def packets() -> st.SearchStrategy[Buf]:
    """Packets from outside the driver: any length (GSO-free), any header flags."""
    return st.builds(Buf, size=st.sampled_from([HEADER_SIZE + 64, HEADER_SIZE + 64,
                                                HEADER_SIZE + 1514, HEADER_SIZE + 1600,
                                                HEADER_SIZE + 10]),
                     csum=st.sampled_from([False, False, True]))


@settings(max_examples=200, deadline=None)
@given(rounds=st.lists(st.tuples(st.lists(rx_bufs(), max_size=RING),
                                 st.lists(packets(), min_size=1, max_size=RING)),
                       min_size=1, max_size=3),
       mergeable=st.booleans(), guest_csum=st.booleans(), drift=st.sampled_from([0, 5]),
       run_max=run_maxes)
def test_receive_runs_do_what_frame_by_frame_does(
        rounds: list[Round], mergeable: bool, guest_csum: bool, drift: int,
        run_max: int) -> None:
    runs, each = _both(rounds, run_max, mergeable=mergeable, guest_csum=guest_csum,
                       drift=drift, gso=False, how="deliver")
    assert runs == each


@settings(max_examples=100, deadline=None)
@given(rounds=st.lists(st.tuples(st.lists(rx_bufs(), max_size=RING),
                                 st.sampled_from([60, 60, 1514, 1600])),
                       min_size=1, max_size=3),
       drift=st.sampled_from([0, 5]), run_max=run_maxes)
def test_fill_runs_do_what_frame_by_frame_does(rounds: list[tuple[list[Buf], int]], drift: int,
                                               run_max: int) -> None:
    runs, each = _both(rounds, run_max, mergeable=True, guest_csum=False, drift=drift,
                       gso=False, how="fill")
    assert runs == each


def test_dpdk_layout_goes_in_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Descriptor i in slot i, as DPDK's virtio-user lays its rings out: every
    frame both ways is read in runs (and all arrive intact)."""
    read: list[int] = []
    real = net_ring.read_run

    def counting(desc: memoryview, first: int, k: int) -> tuple[int, ...]:
        read.append(k)
        return real(desc, first, k)
    monkeypatch.setattr(net_ring, "read_run", counting)
    rig = Rig(mergeable=True, guest_csum=False)
    try:
        rounds: list[Round] = [([RX] * RING, [Buf(size=HEADER_SIZE + 60 + i, flags=0)
                                              for i in range(RING)])] * 3
        rig.run(rounds)
        stats = rig.device.stats
        assert stats.tx_packets == stats.rx_packets == 3 * RING
        assert stats.rx_dropped == 0
        # Each round: one run on the transmit side, one on the receive side,
        # one look at the transmit ring that found packets.
        assert sum(read) == 2 * 3 * RING
        assert stats.tx_bursts == 3
    finally:
        rig.close()


def test_a_run_wraps_the_used_ring() -> None:
    """Used entries ahead of the available ring's slots: a run's entries wrap
    in the middle, each where it belongs."""
    rig = Rig(mergeable=False, guest_csum=True, drift=5)
    try:
        rig.run([([RX] * RING, [TX] * RING)])
        assert rig.device.stats.rx_packets == RING
        used = rig.drivers[0]._used
        entries = [struct.unpack_from("<II", used, 4 + 8 * slot) for slot in range(RING)]
        assert entries == [((slot - 5) % RING, HEADER_SIZE + 64) for slot in range(RING)]
        assert rig.queues[0].used_idx == 5 + RING
    finally:
        rig.close()


def test_a_dropped_packet_behind_held_ones_is_counted_once() -> None:
    """The loopback holds packets while the receive ring is full; an over-MTU
    packet and a GSO packet behind them stay in the transmit ring too and are
    counted when they are dropped or taken, once (not on every look at the
    ring)."""
    rig = Rig(mergeable=True, guest_csum=True, gso=True)
    try:
        # Descriptors out of order: frame by frame.
        held = [Buf(head=5, size=TX.size, flags=0), Buf(head=3, size=TX.size, flags=0),
                Buf(head=9, size=HEADER_SIZE + 1600, flags=0),
                Buf(head=7, size=HEADER_SIZE + 1600, flags=0, gso=True)]
        rig.run([([], held), ([], [])])
        stats = rig.device.stats
        assert (stats.tx_packets, stats.tx_oversize, stats.tx_gso) == (0, 0, 0)
        assert rig.queues[1].used_idx == 0
        assert stats.tx_bursts == 0  # looks that sent nothing are not bursts
        rig.run([([RX] * 4, [])])
        assert (stats.tx_packets, stats.tx_oversize, stats.tx_gso) == (3, 1, 1)
        assert stats.tx_bursts == 1
        assert (stats.rx_packets, stats.rx_gso) == (3, 1)
        assert rig.queues[1].used_idx == 4
    finally:
        rig.close()


class Refilling(Port):
    """A driver on another core that keeps the transmit ring full: whatever the
    device completed is offered again before its next look at the ring. Drops
    what it is sent; gives up (raises) after ``limit`` packets, so a device
    that never returns fails instead of hanging."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sent = 0
        self.rig: Rig | None = None
        self._taken = 0
        self._frame = bytes(HEADER_SIZE) + udp_frame(60)

    def send_burst(self, packets: list[memoryview], pair: int) -> int:
        self.sent += len(packets)
        if self.sent > self.limit:
            raise RuntimeError(f"still sending after {self.sent} packets in one call")
        self._taken += len(packets)
        return len(packets)

    def end_batch(self) -> None:
        # The burst is completed: the driver offers as many packets again.
        self.offer(self._taken)
        self._taken = 0

    def offer(self, count: int) -> None:
        assert self.rig is not None
        driver = self.rig.drivers[1]
        for _ in range(count):
            head = driver.avail_idx % RING
            gpa = HALF - SLOT * (RING - head)  # the top of the low region
            driver.write_desc(head, gpa, len(self._frame), 0, 0)
            self.rig.ram.write(gpa, self._frame)
            driver.make_available(head)
        driver.publish()


def test_a_transmit_ring_that_never_empties_lets_process_return(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The device keeps looking at a busy transmit ring instead of waiting for
    the next kick, but one ``process`` call takes a bounded share: the runtime
    must get to publish, and to let other tasks (other queues and devices, the
    vhost-user connection) run."""
    monkeypatch.setattr(net_device, "BUSY_BURST", 4)  # a ring of 16 counts as busy
    port = Refilling(limit=1 << 16)
    rig = Rig(mergeable=False, guest_csum=True, port=port)
    port.rig = rig
    try:
        tx_driver, tx_queue = rig.drivers[1], rig.queues[1]
        port.offer(RING)  # the first ring full
        for _ in range(3):
            before = port.sent
            rig.device.process(tx_queue)
            tx_queue.publish()
            assert 0 < port.sent - before <= net_device.TX_BUDGET + RING
        assert len(tx_driver.collect()) == port.sent
        assert rig.device.stats.tx_packets == port.sent
    finally:
        rig.close()
