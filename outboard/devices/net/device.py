"""virtio-net (device id 1): queue pairs, the control queue, and a port behind.

Queue layout (virtio 1.2, 5.1.2): ``rx0, tx0, rx1, tx1, ..., ctrl``. Every
packet in either direction is the 12-byte ``virtio_net_hdr_v1`` and then the
frame. Transmitted frames go to the device's ``Port`` (a tap, a switch port, a
loopback, a generator); frames from the port are delivered to a receive queue,
chosen by the queue pair they came from among the pairs the driver uses.

A frame that cannot be delivered is dropped and counted in ``stats``: no
receive buffer (the ring is full), a buffer too small without MRG_RXBUF, a
frame longer than the MTU, or one not addressed to this device when the
driver turned promiscuous mode off. Nothing else changes: the next frame that
fits is delivered.
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import trio

from ...backend import QueueSpec, SplitQueue, VirtioDevice, VirtioDeviceId, bit
from .pcap import PcapWriter
from .port import Generator, Loopback, Port
from .ring import MIN_PACKET, Backpressure, NetStats, RxRing, RxStatus, TxRing
from .switch import Switch
from .tap import Tap
from .wire import (
    CONFIG,
    CSUM_START_OFFSET,
    ETH_ALEN,
    ETH_HLEN,
    HEADER_SIZE,
    MAX_GSO_FRAME,
    MQ_VQ_PAIRS_MAX,
    MQ_VQ_PAIRS_MIN,
    NUM_BUFFERS_OFFSET,
    VLAN_HLEN,
    CtrlAck,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    HeaderFlag,
    NetFeature,
    NetStatus,
)

__all__ = ["EPILOG", "NetDevice", "finish_checksum", "format_mac", "parse_mac"]

log = logging.getLogger("outboard.net")

EPILOG = """\
attach to QEMU (guest RAM must be shared), N queue pairs:
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=c0,path=SOCKET
  -netdev vhost-user,id=n0,chardev=c0,queues=N
  -device virtio-net-pci,netdev=n0,mq=on,vectors=2*N+2
  (QEMU 7.2 under TCG crashes in vhost_net_start with any vhost-user-net
  back-end when the device has MSI-X: there, use vectors=0)

attach DPDK (no VM, no hugepages):
  dpdk-testpmd --no-huge -m 256 --no-pci --vdev net_virtio_user0,path=SOCKET,queues=N ...

several devices on one switch, one socket each (MACs count up from --mac):
  outboard net --switch sw0 --socket-path a.sock --socket-path b.sock
"""

BROADCAST = b"\xff" * ETH_ALEN
DEFAULT_MTU = 1500
#: a transmit burst at least this long means a busy driver (see ``_transmit``)...
BUSY_BURST = 32
#: ...and this many looks at its ring find nothing before the device waits
BUSY_LOOKS = 64
#: a busy transmit ring is taken this many packets at a time, each chunk
#: published both ways before the next is taken (one run of descriptors)
TX_CHUNK = 256
#: at most this many packets in one ``process`` call (then the runtime
#: publishes and, its time slice used, lets other tasks run)
TX_BUDGET = 1024
#: the largest MTU (config space ``mtu`` is 16 bits; frames must fit one GSO packet)
MAX_MTU = 65535 - ETH_HLEN - VLAN_HLEN
_u16 = struct.Struct("<H")
_u32 = struct.Struct("<I")
_csum = struct.Struct("!H")

#: what every net device offers, whatever its port
BASE_FEATURES = (
    bit(NetFeature.MAC) | bit(NetFeature.STATUS) | bit(NetFeature.MRG_RXBUF)
    | bit(NetFeature.MTU) | bit(NetFeature.CTRL_VQ) | bit(NetFeature.CTRL_RX)
    | bit(NetFeature.CTRL_MAC_ADDR)
)
#: features that let a transmitted frame be longer than the MTU
HOST_GSO = (bit(NetFeature.HOST_TSO4) | bit(NetFeature.HOST_TSO6) | bit(NetFeature.HOST_UFO)
            | bit(NetFeature.HOST_USO))
GUEST_GSO = (bit(NetFeature.GUEST_TSO4) | bit(NetFeature.GUEST_TSO6)
             | bit(NetFeature.GUEST_UFO) | bit(NetFeature.GUEST_USO4)
             | bit(NetFeature.GUEST_USO6))


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(mac) != ETH_ALEN or any(len(p) > 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random unicast, locally administered address."""
    mac = bytearray(os.urandom(ETH_ALEN))
    mac[0] = (mac[0] & 0xFC) | 0x02
    return bytes(mac)


def nth_mac(mac: bytes, n: int) -> bytes:
    return ((int.from_bytes(mac, "big") + n) % (1 << 48)).to_bytes(ETH_ALEN, "big")


def finish_checksum(packet: memoryview | bytes | bytearray) -> bytearray:
    """A copy of ``packet`` with the checksum its sender left partial
    (VIRTIO_NET_HDR_F_NEEDS_CSUM) filled in, and the header's fields cleared.

    The checksum field holds the pseudo-header sum; the device adds the bytes
    from ``csum_start`` to the end and stores the complement (5.1.6.2).
    """
    out = bytearray(packet)
    start, offset = struct.unpack_from("<HH", out, CSUM_START_OFFSET)
    frame = memoryview(out)[HEADER_SIZE:]
    where = start + offset
    if out[0] & HeaderFlag.NEEDS_CSUM and where + 2 <= len(frame) and start < len(frame):
        data = bytes(frame[start:])
        if len(data) & 1:
            data += b"\0"
        # The ones' complement sum of 16-bit words is the number mod 0xFFFF.
        total = int.from_bytes(data, "big") % 0xFFFF
        _csum.pack_into(frame, where, ~total & 0xFFFF or 0xFFFF)
    out[:NUM_BUFFERS_OFFSET] = bytes(NUM_BUFFERS_OFFSET)  # flags, GSO and csum fields
    return out


class NetDevice(VirtioDevice):
    device_id = VirtioDeviceId.NET
    type_name = "net"

    def __init__(self, port: Port, *, mac: bytes | None = None, queue_pairs: int = 1,
                 mtu: int = DEFAULT_MTU, capture: PcapWriter | None = None,
                 queue_size: int = 1024, config_space: bool = False) -> None:
        super().__init__()
        if not MQ_VQ_PAIRS_MIN <= queue_pairs <= MQ_VQ_PAIRS_MAX:
            raise ValueError(f"queue pairs must be 1 to {MQ_VQ_PAIRS_MAX}, not {queue_pairs}")
        if not 68 <= mtu <= MAX_MTU:
            raise ValueError(f"MTU must be 68 to {MAX_MTU}, not {mtu}")
        self.port = port
        self.default_mac = mac if mac is not None else random_mac()
        self.mac = self.default_mac
        self.queue_pairs = queue_pairs
        self.mtu = mtu
        self.capture = capture
        self.queue_size = queue_size
        #: serve the config space over the transport (see ``config``)
        self.config_space = config_space
        self.stats = NetStats()
        self._logged_stats = NetStats()
        self.features = BASE_FEATURES | port.features
        if queue_pairs > 1:
            self.features |= bit(NetFeature.MQ)
        # Receive filter (5.1.6.5.1); promiscuous until the driver says otherwise.
        self.promisc = True
        self.allmulti = True
        self.unicast: set[bytes] = set()
        self.multicast: set[bytes] = set()
        #: queue pairs the driver uses (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)
        self.active_pairs = 1
        self._tx: list[TxRing] = []
        self._rx: list[RxRing] = []
        #: receive rings frames are delivered to (the pairs in use)
        self._rx_used: list[RxRing] = []
        self._capture_write = capture.write if capture is not None else None
        #: tasks of the current connection (``run``)
        self._nursery: trio.Nursery | None = None
        port.attach(self)
        #: what takes each burst of transmitted packets
        self._send = port.send_burst

    # -- the device API ----------------------------------------------------

    @property
    def queues(self) -> Sequence[QueueSpec]:
        specs: list[QueueSpec] = []
        for i in range(self.queue_pairs):
            specs += [QueueSpec(f"rx{i}", self.queue_size), QueueSpec(f"tx{i}", self.queue_size)]
        specs.append(QueueSpec("ctrl", 64))
        return specs

    @property
    def ctrl_index(self) -> int:
        return 2 * self.queue_pairs

    def config(self) -> bytes:
        """``struct virtio_net_config`` up to ``mtu``, when ``config_space`` is set.

        By default there is none: QEMU and DPDK's virtio-user build a net
        device's config space themselves (MAC, link, pairs and MTU from their
        own options) and never read it over vhost-user, and QEMU warns about a
        net back-end that offers VHOST_USER_PROTOCOL_F_CONFIG (which the
        transport offers whenever there is a config space).
        """
        if not self.config_space:
            return b""
        return self.config_layout()

    def config_layout(self) -> bytes:
        return CONFIG.pack(self.mac, NetStatus.LINK_UP, self.queue_pairs, self.mtu)

    def bind(self, queues: Sequence[SplitQueue]) -> None:
        super().bind(queues)
        self._tx = [TxRing(queues[2 * i + 1], i, self.stats) for i in range(self.queue_pairs)]
        self._rx = [RxRing(queues[2 * i], self.stats) for i in range(self.queue_pairs)]
        self._configure_rings()

    def activate(self, features: int) -> None:
        super().activate(features)
        self.active_pairs = 1
        self._configure_rings()
        self.port.activate(features)


    def reset(self) -> None:
        if self.stats != self._logged_stats:
            log.info("%s: %s", self.port.describe(), self.stats.summary())
            self._logged_stats = replace(self.stats)
        super().reset()
        self.mac = self.default_mac
        self.promisc = self.allmulti = True
        self.unicast.clear()
        self.multicast.clear()
        self.active_pairs = 1
        for ring in self._rx:
            ring.reset()
        self._configure_rings()
        self.port.reset()
        if self.capture is not None:
            self.capture.flush()

    def close(self) -> None:
        self.port.close()
        if self.capture is not None:
            self.capture.close()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if not self.queue_processes:  # else each pair's process does the port's work
                    await self.port.run()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- queue processes: a process per queue pair, with its part of the port --

    def queue_group(self, index: int) -> int | None:
        # The control queue changes settings every pair uses: it stays here.
        return None if index == self.ctrl_index else index // 2

    def queue_fds(self) -> Sequence[int]:
        return self.port.queue_fds()

    def group_fds(self, group: int) -> Sequence[int]:
        return self.port.pair_fds(group)

    def group_poll(self, group: int) -> bool:
        return self.port.poll(group)

    def _configure_rings(self) -> None:
        """Apply the negotiated features and the receive filter to the rings."""
        features = self.driver_features
        max_packet = HEADER_SIZE + self.mtu + ETH_HLEN + VLAN_HLEN
        max_gso_packet = HEADER_SIZE + MAX_GSO_FRAME
        for tx in self._tx:
            tx.max_packet = max_packet
            tx.max_gso_packet = max_gso_packet if features & HOST_GSO & self.features else 0
        for rx in self._rx:
            rx.max_packet = max_packet
            rx.max_gso_packet = max_gso_packet if features & GUEST_GSO & self.features else 0
            rx.mergeable = self.has_feature(NetFeature.MRG_RXBUF)
            rx.guest_csum = self.has_feature(NetFeature.GUEST_CSUM)
            rx.accept = None if self.promisc else self.accepts
            rx.capture = self._capture_write
            rx.hold = self.port.lossless
        # Without a control queue the driver cannot choose pairs: every running
        # pair is used (QEMU and DPDK keep the control queue to themselves and
        # enable pairs with SET_VRING_ENABLE).
        pairs = self.active_pairs if self.has_feature(NetFeature.CTRL_VQ) else self.queue_pairs
        self._rx_used = self._rx[:pairs]

    # -- transmit ----------------------------------------------------------

    def process(self, queue: SplitQueue) -> None:
        index = queue.index
        if index == self.ctrl_index:
            self._control(queue)
        elif index & 1:
            self._transmit(self._tx[index >> 1])
        else:
            self.port.ready(index >> 1)

    def _transmit(self, tx: TxRing) -> None:
        """Drain a transmit ring. A driver that keeps it busy refills it within
        microseconds of seeing the used entries, while going back to the event
        loop for its next kick costs tens: after a full burst the entries are
        published at once and the ring looked at again, a few times, before
        returning. A busy ring is taken a chunk at a time, and each chunk is
        published both ways (its transmit entries first, then the frames it
        put in receive rings) before the next is taken: the driver works on
        one chunk while the device works on the next, instead of the two
        taking turns. One call takes at most ``TX_BUDGET`` packets."""
        queue = tx.queue
        send, capture = self._send, self._capture_write
        sent = tx.drain(send, capture, TX_CHUNK)
        budget = TX_BUDGET - sent
        while sent >= BUSY_BURST and budget > 0:
            queue.flush()
            self.port.end_batch()
            looks = 0
            while not queue.available():
                looks += 1
                if looks == BUSY_LOOKS:
                    return
            sent = tx.drain(send, capture, TX_CHUNK)
            budget -= sent
        self.port.end_batch()

    def transmit_all(self) -> None:
        """Take what waits in every transmit ring now (a lossless port whose
        receive ring had been full), and tell the driver."""
        for tx in self._tx:
            if tx.queue.active:
                tx.drain(self._send, self._capture_write)
                tx.queue.flush()
        self.port.end_batch()

    # -- receive -----------------------------------------------------------

    def _ring(self, pair: int) -> RxRing | None:
        """A running receive ring for frames from queue pair ``pair``, open for a
        burst: the pair's own if it runs, else the first that does."""
        used = self._rx_used
        if not used:
            return None
        ring = used[pair % len(used)]
        if ring.is_open or ring.open():
            return ring
        for ring in used:
            if ring.is_open or ring.open():
                return ring
        return None

    def deliver(self, packet: memoryview | bytes | bytearray, pair: int = 0) -> None:
        """A packet (header, then frame) for the driver; dropped and counted if it
        cannot be delivered. End the burst with ``end_receive``."""
        used = self._rx_used
        ring = used[pair % len(used)] if used else None
        if ring is None or not (ring.is_open or ring.open()):
            ring = self._ring(pair)
            if ring is None:
                if self.port.lossless:
                    raise Backpressure  # wait in the transmit ring for a receive queue
                self.stats.rx_no_queue += 1
                return
        n = len(packet)
        if n > ring.max_packet or n < MIN_PACKET or packet[0] or ring.accept is not None:
            checked = self._check(ring, packet)
            if checked is None:
                return
            packet = checked
        if ring.put(packet) == RxStatus.OK and n > ring.max_packet:
            self.stats.rx_gso += 1

    def deliver_burst(self, packets: list[memoryview], pair: int = 0) -> int:
        """``deliver`` each of ``packets`` in order; how many were taken (fewer
        than all only when a lossless port waits for receive buffers)."""
        used = self._rx_used
        ring = used[pair % len(used)] if used else None
        if ring is not None and (ring.is_open or ring.open()):
            return ring.put_burst(packets, self.deliver, pair)
        for i, packet in enumerate(packets):
            try:
                self.deliver(packet, pair)
            except Backpressure:
                return i
        return len(packets)

    def _check(self, ring: RxRing, packet: memoryview | bytes | bytearray,
               ) -> memoryview | bytes | bytearray | None:
        """The uncommon cases of ``deliver``: the packet to deliver, or None (counted)."""
        n = len(packet)
        if n > ring.max_packet and (n > ring.max_gso_packet or not packet[1]):
            self.stats.rx_oversize += 1
            return None
        if n < MIN_PACKET:
            self.stats.rx_errors += 1
            return None
        if ring.accept is not None and not ring.accept(memoryview(packet)):
            self.stats.rx_filtered += 1
            return None
        if packet[0] and not ring.guest_csum:
            return finish_checksum(packet)
        return packet

    def end_receive(self) -> None:
        """Publish what ``deliver`` put in the rings: one interrupt per queue."""
        for ring in self._rx:
            if ring.is_open:
                ring.close()

    def fill(self, pair: int, packet: bytes) -> int:
        """Deliver ``packet`` into every buffer the driver offers now (a traffic
        source); the number delivered."""
        ring = self._ring(pair)
        if ring is None:
            return 0
        count = ring.fill(packet)
        ring.close()
        return count

    def receive_from(self, pair: int, fd: int, overflow: memoryview, limit: int) -> int:
        """Read up to ``limit`` frames from a tap fd into receive buffers and publish
        them. Returns why it stopped: ``RxStatus.EMPTY`` (nothing more to read),
        ``OK`` (the limit), ``RING_FULL`` or ``NO_QUEUE`` (nowhere to put them)."""
        ring = self._ring(pair)
        if ring is None:
            return RxStatus.NO_QUEUE
        read_frame = ring.read_frame
        status = RxStatus.OK
        try:
            for _ in range(limit):
                status = read_frame(fd, overflow)
                if status in (RxStatus.EMPTY, RxStatus.RING_FULL, RxStatus.NO_QUEUE):
                    break
            else:
                status = RxStatus.OK
        finally:
            ring.close()
        return status

    def can_receive(self, pair: int) -> bool:
        """Whether a frame from pair ``pair`` would find a buffer now."""
        ring = self._ring(pair)
        if ring is None:
            return False
        ready = bool(ring.stash) or ring.queue.available() > 0
        ring.close()
        return ready

    def accepts(self, packet: memoryview) -> bool:
        """The receive filter: is this frame for us (5.1.6.5.1)?"""
        dst = bytes(packet[HEADER_SIZE:HEADER_SIZE + ETH_ALEN])
        if dst[0] & 1:
            return dst == BROADCAST or self.allmulti or dst in self.multicast
        return dst == self.mac or dst in self.unicast

    # -- the control queue -------------------------------------------------

    def _control(self, queue: SplitQueue) -> None:
        commands = 0
        for chain in queue:
            written = 0
            if chain.writable_size < 1:
                log.warning("control command without an ack byte (head %d)", chain.head)
            else:
                ack = self.command(chain.read())
                written = chain.write(bytes((ack,)))
                commands += 1
            queue.push(chain, written)
        if commands:
            self.settings_changed()  # queue processes start again from the new settings

    def command(self, request: bytes) -> CtrlAck:
        """Apply one control command (class, command, data); VIRTIO_NET_OK or _ERR."""
        if len(request) < 2:
            log.warning("control command of %d bytes", len(request))
            return CtrlAck.ERR
        klass, command, data = request[0], request[1], request[2:]
        try:
            ok = self._command(klass, command, data)
        except (ValueError, struct.error) as exc:
            # str(): a record holding the exception would hold its frames (and
            # through them guest memory) for as long as the record lives.
            log.warning("control command %d.%d refused: %s", klass, command, str(exc))
            ok = False
        if not ok:
            log.info("control command %d.%d (%d bytes) answered with an error", klass,
                     command, len(data))
        return CtrlAck.OK if ok else CtrlAck.ERR

    def _command(self, klass: int, command: int, data: bytes) -> bool:
        if klass == CtrlClass.RX and self.has_feature(NetFeature.CTRL_RX):
            if command not in (CtrlRx.PROMISC, CtrlRx.ALLMULTI) or len(data) != 1:
                return False
            if command == CtrlRx.PROMISC:
                self.promisc = bool(data[0])
            else:
                self.allmulti = bool(data[0])
            self._configure_rings()
            return True
        if klass == CtrlClass.MAC:
            if command == CtrlMac.ADDR_SET and self.has_feature(NetFeature.CTRL_MAC_ADDR):
                if len(data) != ETH_ALEN:
                    return False
                self.mac = bytes(data)
                return True
            if command == CtrlMac.TABLE_SET and self.has_feature(NetFeature.CTRL_RX):
                unicast, rest = _mac_table(data)
                multicast, rest = _mac_table(rest)
                if rest:
                    raise ValueError(f"{len(rest)} bytes after the MAC tables")
                self.unicast, self.multicast = unicast, multicast
                return True
            return False
        if klass == CtrlClass.MQ and command == CtrlMq.VQ_PAIRS_SET \
                and self.has_feature(NetFeature.MQ):
            if len(data) != 2:
                return False
            pairs = _u16.unpack(data)[0]
            if not MQ_VQ_PAIRS_MIN <= pairs <= self.queue_pairs:
                return False
            self.active_pairs = pairs
            self._configure_rings()
            log.info("driver uses %d queue pair%s", pairs, "s" if pairs > 1 else "")
            return True
        return False

    # -- the command line --------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        port = parser.add_mutually_exclusive_group()
        port.add_argument("--tap", metavar="NAME",
                          help="a host tap device (created if it does not exist; needs "
                               "CAP_NET_ADMIN); offloads pass through")
        port.add_argument("--switch", metavar="NAME",
                          help="an in-process learning switch joining every device of "
                               "this process (give several --socket-path)")
        port.add_argument("--loopback", action="store_true",
                          help="every frame sent comes back to the same device")
        port.add_argument("--generate", type=int, metavar="BYTES",
                          help="a traffic source: fill every receive buffer with a UDP "
                               "frame of BYTES bytes; drop what is sent (for benchmarks)")
        parser.add_argument("--mac", metavar="MAC",
                            help="the device's MAC address; further devices count up from "
                                 "it (default: random, locally administered)")
        parser.add_argument("--queues", type=int, default=1, metavar="N",
                            help="queue pairs (default 1)")
        parser.add_argument("--mtu", type=int, default=DEFAULT_MTU, metavar="N",
                            help=f"the MTU the driver is told (default {DEFAULT_MTU})")
        parser.add_argument("--capture", metavar="FILE",
                            help="write every frame, both directions, to this pcap file "
                                 "(several devices: FILE-0.pcap, FILE-1.pcap, ...)")
        parser.add_argument("--queue-size", type=int, default=1024, metavar="N",
                            help="largest ring size the driver may choose (default 1024)")
        parser.add_argument("--queue-processes", action="store_true",
                            help="serve each queue pair from a process of its own, so that "
                                 "pairs run on several cores (vhost-user; --tap, --loopback "
                                 "or --generate)")
        parser.add_argument("--config-space", action="store_true",
                            help="serve the config space (MAC, link, pairs, MTU) over "
                                 "vhost-user; QEMU and DPDK build their own (QEMU warns "
                                 "about a net back-end that offers one)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NetDevice:
        return cls.devices_from_args(args, 1)[0]

    @staticmethod
    def _check_queue_processes(args: argparse.Namespace) -> None:
        if not args.queue_processes:
            return
        if args.transport != "vhost-user":
            raise ValueError("--queue-processes is for vhost-user (vfio-user routes "
                             "interrupts through the MSI-X table in one process)")
        if args.switch:
            raise ValueError("--queue-processes does not go with --switch (one switch "
                             "for every device of the process)")
        if args.capture:
            raise ValueError("--queue-processes does not go with --capture (one file)")

    @classmethod
    def devices_from_args(cls, args: argparse.Namespace, count: int) -> list[NetDevice]:
        """``count`` devices (one per --socket-path) sharing the chosen port kind."""
        cls._check_queue_processes(args)
        mac = parse_mac(args.mac) if args.mac else None
        ports = _ports(args, count)
        devices: list[NetDevice] = []
        try:
            for i, port in enumerate(ports):
                capture = None
                if args.capture:
                    capture = PcapWriter(_capture_path(args.capture, i, count))
                devices.append(cls(port, mac=nth_mac(mac, i) if mac else None,
                                   queue_pairs=args.queues, mtu=args.mtu, capture=capture,
                                   queue_size=args.queue_size,
                                   config_space=args.config_space))
                devices[-1].queue_processes = args.queue_processes
                log.info("device %d: %s, MAC %s, %d queue pair%s", i, port.describe(),
                         format_mac(devices[-1].mac), args.queues,
                         "s" if args.queues > 1 else "")
        except BaseException:
            for device in devices:
                device.close()
            for port in ports[len(devices):]:
                port.close()
            raise
        return devices

    @classmethod
    def capabilities(cls) -> dict[str, object]:
        return {"type": "net"}


def _ports(args: argparse.Namespace, count: int) -> list[Port]:
    if args.tap:
        if count > 1:
            raise ValueError("one tap serves one device: give --socket-path once with --tap")
        return [Tap(args.tap, args.queues)]
    if args.switch:
        switch = Switch(args.switch)
        return [switch.port() for _ in range(count)]
    if args.loopback:
        return [Loopback() for _ in range(count)]
    if args.generate is not None:
        return [Generator(args.generate) for _ in range(count)]
    raise ValueError("choose where frames go: --tap, --switch, --loopback or --generate")


def _capture_path(path: str, index: int, count: int) -> str:
    if count == 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{index}{p.suffix}"))


def _mac_table(data: bytes) -> tuple[set[bytes], bytes]:
    """One ``virtio_net_ctrl_mac`` table: a le32 count, then that many addresses."""
    (entries,) = _u32.unpack_from(data)
    end = 4 + entries * ETH_ALEN
    if len(data) < end:
        raise ValueError(f"a MAC table of {entries} entries in {len(data)} bytes")
    return {data[i:i + ETH_ALEN] for i in range(4, end, ETH_ALEN)}, data[end:]

