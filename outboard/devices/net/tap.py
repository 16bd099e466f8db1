"""A host tap device as a net device's port.

The tap is opened with IFF_VNET_HDR and a 12-byte vnet header (struct
virtio_net_hdr_v1), so a packet moves between the tap and guest memory as is:
a frame the driver sends is written to the tap with its header, and a frame
from the host is read straight into a receive buffer, header first. Checksum
and segmentation offloads therefore pass through: the driver's HOST_* features
need nothing from us (the kernel takes partial checksums and GSO frames from a
writer), and its GUEST_* features become the tap's offload flags
(TUNSETOFFLOAD), which tell the kernel what it may hand to a reader.

With several queue pairs the tap is opened once per pair (IFF_MULTI_QUEUE);
the kernel spreads flows over the queues, and queue ``i`` feeds receive queue
``i``. A tap that does not exist is created, and goes away with the process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

import trio

from ...backend import OwnedFd, bit
from .port import Port
from .ring import MAX_PACKET, RxStatus, is_dropped_frame_error
from .wire import HEADER_SIZE, NetFeature

__all__ = ["Tap", "offload_flags"]

log = logging.getLogger("outboard.net")

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: a driver's GUEST_* feature -> the tap offload it allows
_GUEST_OFFLOADS = (
    (NetFeature.GUEST_TSO4, TUN_F_TSO4),
    (NetFeature.GUEST_TSO6, TUN_F_TSO6),
    (NetFeature.GUEST_ECN, TUN_F_TSO_ECN),
    (NetFeature.GUEST_UFO, TUN_F_UFO),
)
_ifreq = struct.Struct(f"{IFNAMSIZ}sH22x")
#: frames read per wake-up before other tasks get a turn
READ_BURST = 256


def offload_flags(features: int) -> int:
    """The TUNSETOFFLOAD flags for a driver that accepted ``features``."""
    if not features >> NetFeature.GUEST_CSUM & 1:
        return 0  # every offload needs partial checksums
    flags = TUN_F_CSUM
    for feature, flag in _GUEST_OFFLOADS:
        if features >> feature & 1:
            flags |= flag
    return flags


class Tap(Port):
    """The tap ``name``, opened ``queues`` times (one per queue pair)."""

    def __init__(self, name: str, queues: int = 1) -> None:
        super().__init__()
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"tap name {name!r} must have 1 to {IFNAMSIZ - 1} bytes")
        if queues < 1:
            raise ValueError("a tap needs at least one queue")
        self.name = name
        self.fds: list[OwnedFd] = []
        self.write_errors = 0
        self._waiters: list[trio.Event | None] = [None] * queues
        self._overflow: memoryview | None = None
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        try:
            for _ in range(queues):
                self.fds.append(self._open(flags))
            self.features = self._probe_offloads()
        except BaseException:
            self.close()
            raise

    def _open(self, flags: int) -> OwnedFd:
        fd = OwnedFd(os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        try:
            answer = fcntl.ioctl(fd.fd, TUNSETIFF, _ifreq.pack(self.name.encode(), flags))
            self.name = _ifreq.unpack(answer)[0].rstrip(b"\0").decode()
            fcntl.ioctl(fd.fd, TUNSETVNETHDRSZ, struct.pack("i", HEADER_SIZE))
        except OSError as exc:
            fd.close()
            raise OSError(exc.errno, f"cannot open tap {self.name}: {exc.strerror}") from None
        return fd

    def _probe_offloads(self) -> int:
        """The offload features this kernel's tap takes (UFO came and went)."""
        fd = self.fds[0].fd
        features = bit(NetFeature.CSUM) | bit(NetFeature.GUEST_CSUM)
        tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        for flags, bits in ((tso, (NetFeature.HOST_TSO4, NetFeature.HOST_TSO6,
                                   NetFeature.HOST_ECN, NetFeature.GUEST_TSO4,
                                   NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN)),
                            (TUN_F_CSUM | TUN_F_UFO, (NetFeature.HOST_UFO, NetFeature.GUEST_UFO))):
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            except OSError:
                continue
            for feature in bits:
                features |= bit(feature)
        self._set_offloads(0)
        return features

    def _set_offloads(self, flags: int) -> None:
        for fd in self.fds:
            if not fd.closed:
                fcntl.ioctl(fd.fd, TUNSETOFFLOAD, flags)

    # -- the port ----------------------------------------------------------

    def activate(self, features: int) -> None:
        flags = offload_flags(features)
        self._set_offloads(flags)
        log.info("tap %s: offloads %#x", self.name, flags)

    def reset(self) -> None:
        self._set_offloads(0)

    def send(self, packet: memoryview, pair: int) -> None:
        fds = self.fds
        try:
            os.write(fds[pair % len(fds)].fd, packet)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError) and not is_dropped_frame_error(exc):
                raise
            self.write_errors += 1
            if self.write_errors == 1:
                log.warning("tap %s: frame of %d bytes refused: %s", self.name,
                            len(packet) - HEADER_SIZE, exc)

    def ready(self, pair: int) -> None:
        # Any queue's buffers may be the ones a reader waits for (a reader
        # whose own queue is disabled delivers to another).
        for index, event in enumerate(self._waiters):
            if event is not None:
                event.set()
                self._waiters[index] = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for index, fd in enumerate(self.fds):
                nursery.start_soon(self._reader, index, fd.fd, name=f"tap-{self.name}-{index}")

    async def _reader(self, index: int, fd: int) -> None:
        device = self.device
        overflow = memoryview(bytearray(MAX_PACKET))
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                status = device.receive_from(index, fd, overflow, READ_BURST)
                if status == RxStatus.EMPTY:
                    break
                if status == RxStatus.OK:
                    await trio.lowlevel.checkpoint()  # a long burst: let others run
                    continue
                # No buffer (or no running queue): wait until the driver offers some.
                event = trio.Event()
                self._waiters[index] = event
                if device.can_receive(index):
                    self._waiters[index] = None
                    continue
                await event.wait()

    def queue_fds(self) -> list[int]:
        return [fd.fd for fd in self.fds]

    def pair_fds(self, pair: int) -> list[int]:
        # Only while the pair's receive ring has room: a readable tap with
        # nowhere to put the frame would wake the process for nothing.
        if pair < len(self.fds) and self.device.can_receive(pair):
            return [self.fds[pair].fd]
        return []

    def poll(self, pair: int) -> bool:
        if pair >= len(self.fds):
            return False
        if self._overflow is None:
            self._overflow = memoryview(bytearray(MAX_PACKET))
        status = self.device.receive_from(pair, self.fds[pair].fd, self._overflow, READ_BURST)
        return status == RxStatus.OK  # the burst limit: there may be more

    def close(self) -> None:
        for fd in self.fds:
            fd.close()

    def describe(self) -> str:
        return f"tap {self.name} ({len(self.fds)} queue{'s' if len(self.fds) > 1 else ''})"
