"""Where a net device's frames go and come from: the ``Port`` interface, and the
two ports that need nothing outside the process (loopback and a generator).

The device hands every frame the driver transmits to ``Port.send`` (the 12-byte
virtio-net header, then the frame, as one view into guest memory that is valid
only during the call) and calls ``end_batch`` after each burst. A port gives
frames to the device with ``NetDevice.deliver`` (or, for a tap, reads them
straight into receive buffers) and ends each burst of deliveries with
``NetDevice.end_receive``, which publishes them with one interrupt per queue.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import trio

from ...backend import bit
from .ring import Backpressure
from .wire import ETH_HLEN, HEADER, NetFeature

if TYPE_CHECKING:
    from .device import NetDevice

__all__ = ["Generator", "Loopback", "Port", "udp_frame"]


class Port:
    """The back-end half of a net device. Subclasses override what they need."""

    #: device feature bits (offloads) the port can honour
    features: int = 0
    #: a frame for a full receive ring waits in the transmit ring instead of
    #: being dropped (only for a port whose frames come from the same device)
    lossless: bool = False

    def __init__(self) -> None:
        self._device: NetDevice | None = None

    @property
    def device(self) -> NetDevice:
        if self._device is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a device")
        return self._device

    def attach(self, device: NetDevice) -> None:
        """``device`` is the one this port serves (called once, by the device)."""
        self._device = device

    def activate(self, features: int) -> None:
        """The driver accepted ``features`` (a tap turns offloads on here)."""

    def reset(self) -> None:
        """The driver reset the device, or went away."""

    def send(self, packet: memoryview, pair: int) -> None:
        """One frame from the driver's transmit queue ``pair``."""

    def send_burst(self, packets: list[memoryview], pair: int) -> int:
        """Frames from the driver's transmit queue ``pair``, in order; how many
        were taken. A port that cannot take one now (``send`` raised
        ``Backpressure``) stops there: that frame and the rest stay in the
        transmit ring. Override it where a burst is cheaper than its frames."""
        send = self.send
        for i, packet in enumerate(packets):
            try:
                send(packet, pair)
            except Backpressure:
                return i
        return len(packets)

    def end_batch(self) -> None:
        """The end of a burst of ``send`` calls."""

    def ready(self, pair: int) -> None:
        """The driver offered receive buffers on queue pair ``pair``."""

    async def run(self) -> None:
        """Receive from outside for the life of a connection (cancelled at its end)."""

    # With queue processes, each pair's process does the port's work for its pair.

    def queue_fds(self) -> list[int]:
        """fds a queue pair's process needs (it closes every other)."""
        return []

    def pair_fds(self, pair: int) -> list[int]:
        """fds whose readiness should wake the process of ``pair`` now."""
        return []

    def poll(self, pair: int) -> bool:
        """Receive for ``pair`` what is there now; True to be asked again at once."""
        return False

    def close(self) -> None:
        """Release what the port holds."""

    def describe(self) -> str:
        return type(self).__name__.lower()


class Loopback(Port):
    """Every frame the driver sends comes back on its receive queue. Nothing is
    lost: while the receive ring is full (or the receive queue does not run
    yet), frames wait in the transmit ring, and the driver's next receive
    buffers let them through."""

    features = bit(NetFeature.CSUM) | bit(NetFeature.GUEST_CSUM)
    lossless = True

    def send(self, packet: memoryview, pair: int) -> None:
        self.device.deliver(packet, pair)

    def send_burst(self, packets: list[memoryview], pair: int) -> int:
        return self.device.deliver_burst(packets, pair)

    def end_batch(self) -> None:
        self.device.end_receive()

    def ready(self, pair: int) -> None:
        self.device.transmit_all()


def udp_frame(size: int, *, dst: bytes = b"\xff" * 6,
              src: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """An Ethernet frame of ``size`` bytes holding an IPv4 UDP datagram (198.18.0.1
    to 198.18.0.2, the benchmarking range) with a counting payload."""
    if not 42 <= size <= 65535:
        raise ValueError(f"a UDP frame has 42 to 65535 bytes, not {size}")
    payload = bytes(i & 0xFF for i in range(size - 42))
    ip_length = size - ETH_HLEN
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_length, 0, 0x4000, 64, 17, 0,
                               bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2))))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", ip, 10, ~total & 0xFFFF)
    udp = struct.pack("!HHHH", 1024, 1024, ip_length - 20, 0)
    return dst + src + b"\x08\x00" + bytes(ip) + udp + payload


class Generator(Port):
    """A traffic source: every receive buffer the driver offers is filled with a
    fixed UDP frame; what the driver sends is dropped. For benchmarks: the
    device side of DPDK testpmd's txonly mode.

    Like a DPDK back-end it polls: while the driver keeps offering buffers it
    looks again at every scheduling point, and only after ``SPIN`` looks that
    found nothing does it wait for the driver's next kick.
    """

    SPIN = 64

    def __init__(self, frame_size: int) -> None:
        super().__init__()
        self.frame_size = frame_size
        self.packet = HEADER.pack(0, 0, 0, 0, 0, 0, 1) + udp_frame(frame_size)
        self._wake: trio.Event | None = None
        self._idle: dict[int, int] = {}

    def send_burst(self, packets: list[memoryview], pair: int) -> int:
        return len(packets)  # dropped

    def poll(self, pair: int) -> bool:
        # As ``run``, for one pair: look again at once until SPIN looks found nothing.
        idle = self._idle.get(pair, 0)
        idle = 0 if self.device.fill(pair, self.packet) else idle + 1
        self._idle[pair] = idle
        return idle < self.SPIN

    def ready(self, pair: int) -> None:
        self.device.fill(pair, self.packet)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        device = self.device
        idle = 0
        while True:
            filled = 0
            for pair in range(device.queue_pairs):
                filled += device.fill(pair, self.packet)
            idle = 0 if filled else idle + 1
            if idle < self.SPIN:
                await trio.lowlevel.checkpoint()
                continue
            self._wake = trio.Event()
            await self._wake.wait()
            self._wake = None
            idle = 0

    def describe(self) -> str:
        return f"generator of {self.frame_size}-byte frames"
