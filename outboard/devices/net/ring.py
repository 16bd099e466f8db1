"""The net device's hot path over the split rings: no objects per frame.

``SplitQueue.pop`` builds a ``Chain`` (two lists and a memoryview per
descriptor) for every request; at a million frames a second that alone is more
than the time there is. Nearly every chain a network driver offers is a single
descriptor (Linux and DPDK put the virtio-net header in the buffer's headroom),
so here such a chain is read straight from the descriptor table and answered
straight into the used ring. Every other chain (several descriptors, an
indirect table, a buffer outside the cached memory region, anything malformed)
goes to ``SplitQueue.pop`` and so gets the framework's full checks.

Most drivers also keep descriptor i in slot i of the available ring (DPDK's
virtio PMD does, both ways): then a run of up to ``RUN_MAX`` slots names
consecutive descriptors, read in one unpack and checked as a whole (flags,
lengths, the cached region) before anything is copied; a run that fails any
check goes frame by frame as above.

A ring is used in bursts: ``TxRing.drain`` is one burst; an ``RxRing`` is
opened by the first frame of a burst and closed (published, one interrupt) by
``close``. Nothing of guest memory is kept between bursts.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from itertools import repeat
from operator import itemgetter, sub

from ...backend import Chain, GuestMemory, SplitQueue
from .wire import HEADER_SIZE, MAX_GSO_FRAME, NUM_BUFFERS_OFFSET

__all__ = ["Backpressure", "NetStats", "RxRing", "RxStatus", "TxRing", "ring_views"]

log = logging.getLogger("outboard.net")

VIRTQ_DESC_F_WRITE = 2
_unpack_desc = struct.Struct("<QIHH").unpack_from
_num_buffers = struct.Struct("<H")
#: the largest packet (header and frame) the device handles
MAX_PACKET = HEADER_SIZE + MAX_GSO_FRAME
#: the smallest: a header and an Ethernet header
MIN_PACKET = HEADER_SIZE + 14
_DROPPED_FRAME = (errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.EFAULT)


@dataclass(slots=True)
class NetStats:
    """What one device moved and dropped, per direction (tx: from the driver)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    #: longer than the MTU (and not a GSO frame the device offered to take)
    tx_oversize: int = 0
    #: shorter than an Ethernet header
    tx_errors: int = 0
    #: longer than the MTU, passed on as GSO frames (segmentation offload)
    tx_gso: int = 0
    #: looks at the transmit ring that sent packets (tx_packets / tx_bursts:
    #: packets taken per look, the batch the per-look costs are spread over)
    tx_bursts: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    #: no receive buffer (or not enough of them for one frame): the ring was full
    rx_ring_full: int = 0
    #: the buffer is smaller than the frame and the driver did not take MRG_RXBUF
    rx_too_small: int = 0
    #: longer than the MTU the driver was told
    rx_oversize: int = 0
    #: not for this device's MAC address (the driver turned promiscuous mode off)
    rx_filtered: int = 0
    #: the receive queue was not running (no driver, or its pair is disabled)
    rx_no_queue: int = 0
    #: shorter than an Ethernet header
    rx_errors: int = 0
    #: longer than the MTU, delivered as GSO frames (receive offload)
    rx_gso: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> str:
        """The counters that are not zero, for a log line."""
        return ", ".join(f"{k} {v}" for k, v in self.as_dict().items() if v) or "no traffic"

    @property
    def rx_dropped(self) -> int:
        return (self.rx_ring_full + self.rx_too_small + self.rx_oversize + self.rx_no_queue
                + self.rx_errors)


def ring_views(queue: SplitQueue) -> tuple[memoryview, memoryview, memoryview] | None:
    """The available ring (as u16), descriptor table and used ring (as u32) of a
    queue with rings, or None. The views are used for one burst and dropped, so
    a replaced memory table is never held on to.
    """
    views = queue.ring_views()
    if views is None:
        return None
    avail, desc, used = views
    return avail, desc, used[:4 + 8 * queue.size].cast("I")


_EMPTY = memoryview(b"")
_first_byte = itemgetter(0)
_NO_REGION: tuple[int, int, memoryview] = (0, 0, _EMPTY)


def _first_region(memory: GuestMemory | None) -> tuple[int, int, memoryview]:
    """(gpa, size, view) of the first region: where a lookup starts."""
    if memory is not None:
        for region in memory:
            return region.spec.gpa, region.spec.size, region.view
    return _NO_REGION


def complete(used: memoryview, used_idx: int, size: int, heads: list[int], written: int) -> int:
    """Write used entries (head, written) for ``heads`` in order from ``used_idx``;
    the new used index."""
    entries = array("I", (written, written)) * len(heads)
    entries[0::2] = array("I", heads)
    return _write_used(used, used_idx, size, entries)


def complete_run(used: memoryview, used_idx: int, size: int, first: int, k: int,
                 written: int | Sequence[int] = 0) -> int:
    """Write used entries for heads ``first`` to ``first + k - 1`` with lengths
    ``written`` (one for all, or one each) from ``used_idx``; the new used index."""
    entries = _RUN_ENTRIES[2 * first:2 * (first + k)]
    if isinstance(written, int):
        if written:
            entries[1::2] = array("I", (written,)) * k
    else:
        entries[1::2] = array("I", written)
    return _write_used(used, used_idx, size, entries)


def _write_used(used: memoryview, used_idx: int, size: int, entries: array[int]) -> int:
    """Copy (head, length) pairs into the used ring from ``used_idx`` (in one
    copy, or two where the ring wraps); the new used index."""
    n = len(entries) >> 1
    if not n:
        return used_idx
    start = used_idx & (size - 1)
    first = min(n, size - start)
    used[1 + 2 * start:1 + 2 * (start + first)] = entries[:2 * first]
    if first < n:
        used[1:1 + 2 * (n - first)] = entries[2 * first:]
    return (used_idx + n) & 0xFFFF


#: the longest run of descriptors read in one go
RUN_MAX = 256
#: 0, 1, 2, ...: a slice of the available ring equal to a slice of this names
#: consecutive descriptors
_CONSECUTIVE = memoryview(array("H", range(1 << 15)))
_run_unpackers: dict[int, Callable[[memoryview, int], tuple[int, ...]]] = {}
#: (i, 0) for every descriptor i: a run's used entries are a slice of this
_RUN_ENTRIES = array("I", bytes(8 << 15))
_RUN_ENTRIES[0::2] = array("I", range(1 << 15))


def run_length(n: int) -> int:
    """How many of ``n`` (> 0) slots to take as one run: at most ``RUN_MAX``,
    and a power of two, so a handful of unpackers serve every run."""
    return 1 << (min(n, RUN_MAX).bit_length() - 1)


def consecutive(avail: memoryview, start: int, k: int, size: int) -> int:
    """The first head of ``k`` available entries from slot ``start`` if they name
    ``k`` consecutive descriptors of the table (as DPDK's and many drivers'
    rings do: descriptor i always in slot i); else -1."""
    first = avail[2 + start]
    if first + k > size or avail[2 + start:2 + start + k] != _CONSECUTIVE[first:first + k]:
        return -1
    return first


def read_run(desc: memoryview, first: int, k: int) -> tuple[int, ...]:
    """Descriptors ``first`` to ``first + k - 1`` in one unpack: (addr, len,
    flags, next) for each, flat."""
    unpack = _run_unpackers.get(k)
    if unpack is None:
        unpack = _run_unpackers[k] = struct.Struct("<" + "QIHH" * k).unpack_from
    return unpack(desc, first << 4)


class Backpressure(Exception):
    """Raised by a port's ``send``: the packet cannot be taken now and stays in
    the transmit ring (a loopback whose receive ring is full, say)."""


class RxStatus:
    """What became of one frame offered to a receive queue."""

    OK = 0
    #: the ring has no buffer (or too few for the frame)
    RING_FULL = 1
    #: one buffer is too small and the driver did not take MRG_RXBUF
    TOO_SMALL = 2
    #: the queue is not running
    NO_QUEUE = 3
    #: nothing to read (``read_frame``)
    EMPTY = 4
    #: the frame was read but not delivered (filtered or too long)
    DROPPED = 5


class TxRing:
    """One transmit queue: every chain is one packet (header, then the frame)."""

    def __init__(self, queue: SplitQueue, pair: int, stats: NetStats) -> None:
        self.queue = queue
        self.pair = pair
        self.stats = stats
        #: longest packet (header included) without GSO, and with it (0: none offered)
        self.max_packet = HEADER_SIZE + 1514
        self.max_gso_packet = 0
        self._scratch = bytearray(MAX_PACKET)
        #: the memory region of the last buffer (gpa, size, view), during a burst
        self._region: tuple[int, int, memoryview] = _NO_REGION

    def drain(self, send: Callable[[list[memoryview], int], int],
              capture: Callable[[memoryview], None] | None = None,
              limit: int = 0) -> int:
        """Hand every available packet to ``send(packets, pair)`` in bursts (or,
        with a ``limit``, stop once that many chains were taken: a driver
        that keeps the ring full cannot keep the caller here); return how many
        packets were sent.

        ``send`` takes a list of packets and returns how many it took: fewer
        than all means the port pushed back, and the packets it did not take
        stay in the transmit ring (with the ones after them). Oversized and
        runt packets are dropped and counted. Every chain is completed with
        length 0 (the device writes nothing into a tx buffer); the caller
        publishes (the runtime does, after ``process``).
        """
        queue = self.queue
        views = ring_views(queue)
        if views is None:
            return 0
        avail, desc, used = views
        mask = queue.size - 1
        before = self.stats.tx_packets
        first_idx = queue.last_avail_idx
        self._region = _first_region(queue.memory)
        try:
            while count := queue.available():
                if limit and (queue.last_avail_idx - first_idx) & 0xFFFF >= limit:
                    break
                start = queue.last_avail_idx & mask
                end = min(start + count, mask + 1)
                if capture is None:
                    done = self._run(start, run_length(end - start), avail, desc, used, send)
                    if done < 0:
                        break  # backpressure
                    if done:
                        continue
                # The heads up to the end of the ring, read in one go.
                heads = avail[2 + start:2 + end].tolist()
                done = self._burst(heads, desc, used, send, capture)
                if done < 0:
                    break  # backpressure
                if done < len(heads) and not self._one(send, capture):
                    break
        finally:
            self._region = _NO_REGION
        sent = self.stats.tx_packets - before
        if sent:
            self.stats.tx_bursts += 1
        return sent

    def _run(self, start: int, k: int, avail: memoryview, desc: memoryview, used: memoryview,
             send: Callable[[list[memoryview], int], int]) -> int:
        """The straight path: ``k`` packets from slot ``start`` whose descriptors
        are consecutive in the table, each one readable buffer of a packet's
        size in the cached region, sent in one call; how many were completed
        (0: not such a run, -1: the port pushed back). Every check is over the
        whole run at once; a run that fails any goes frame by frame."""
        first = consecutive(avail, start, k, self.queue.size)
        if first < 0:
            return 0
        fields = read_run(desc, first, k)
        addrs = fields[0::4]
        lengths = fields[1::4]
        r_gpa, r_size, r_view = self._region
        if (any(fields[2::4]) or min(lengths) < MIN_PACKET or max(lengths) > self.max_packet
                or min(addrs) < r_gpa or max(addrs) + max(lengths) > r_gpa + r_size):
            return 0
        packets = [r_view[o:o + n] for o, n in zip(map(sub, addrs, repeat(r_gpa)), lengths,
                                                        strict=True)]
        taken = send(packets, self.pair)
        queue = self.queue
        queue.used_idx = complete_run(used, queue.used_idx, queue.size, first, taken)
        queue.last_avail_idx = (queue.last_avail_idx + taken) & 0xFFFF
        stats = self.stats
        stats.tx_packets += taken
        stats.tx_bytes += sum(lengths[:taken]) - taken * HEADER_SIZE
        return taken if taken == k else -1

    def _burst(self, heads: list[int], desc: memoryview, used: memoryview,
               send: Callable[[list[memoryview], int], int],
               capture: Callable[[memoryview], None] | None) -> int:
        """Send the leading ``heads`` that are one readable descriptor each, in one
        call, and complete them; how many (-1 if the port pushed back)."""
        r_gpa, r_size, r_view = self._region
        max_packet = self.max_packet
        min_packet = MIN_PACKET
        packets: list[memoryview] = []
        append = packets.append
        #: positions in ``packets`` of GSO packets (counted once they are taken)
        gso: list[int] = []
        i = 0
        for i, head in enumerate(heads):  # noqa: B007 - ``i`` is used after the loop
            try:
                addr, length, flags, _ = _unpack_desc(desc, head << 4)
            except struct.error:
                break  # a head past the table: the framework refuses it
            if flags:
                break
            offset = addr - r_gpa
            if offset < 0 or offset + length > r_size:
                memory = self.queue.memory
                region = memory.region_of(addr, length) if memory is not None else None
                if region is None:
                    break
                r_gpa, r_size, r_view = self._region = (region.spec.gpa, region.spec.size,
                                                        region.view)
                offset = addr - r_gpa
            packet = r_view[offset:offset + length]
            if length > max_packet or length < min_packet:
                if length < min_packet or length > self.max_gso_packet or not packet[1]:
                    # Dropped by the general path, and counted once it is completed
                    # (not here: a push-back may leave it in the ring).
                    break
                gso.append(len(packets))
            append(packet)
        else:
            i = len(heads)
        if capture is None:
            taken = send(packets, self.pair) if packets else 0
        else:
            # Frame by frame, each recorded once it is taken.
            taken = 0
            for packet in packets:
                if not send([packet], self.pair):
                    break
                capture(packet[HEADER_SIZE:])
                taken += 1
        pushed_back = taken < len(packets)
        if pushed_back:
            # The packet the port refused, and every one after it, stay.
            i = taken
            del packets[taken:]
        self._complete(used, heads[:i])
        stats = self.stats
        stats.tx_packets += taken
        stats.tx_bytes += sum(map(len, packets)) - taken * HEADER_SIZE
        if gso:
            stats.tx_gso += bisect_left(gso, taken)
        return -1 if pushed_back else i

    def _complete(self, used: memoryview, heads: list[int]) -> None:
        queue = self.queue
        queue.used_idx = complete(used, queue.used_idx, queue.size, heads, 0)
        queue.last_avail_idx = (queue.last_avail_idx + len(heads)) & 0xFFFF

    def _admit(self, packet: memoryview) -> bool:
        """A packet longer than the MTU or shorter than an Ethernet header: send
        it (a GSO packet the driver may send; counted once it is taken) or count
        and drop it."""
        n = len(packet)
        stats = self.stats
        if n < MIN_PACKET:
            stats.tx_errors += 1
            return False
        if n > self.max_gso_packet or not packet[1]:
            stats.tx_oversize += 1
            return False
        return True

    def _one(self, send: Callable[[list[memoryview], int], int],
             capture: Callable[[memoryview], None] | None) -> bool:
        """The next chain, whatever its layout, through the framework's walk
        (which refuses a malformed one); False when there is none or the port
        pushed back."""
        queue = self.queue
        chain = queue.pop()
        if chain is None:
            return False
        packet = self._gather(chain)
        if packet is None:
            self.stats.tx_oversize += 1
        elif MIN_PACKET <= len(packet) <= self.max_packet or self._admit(packet):
            if not send([packet], self.pair):
                queue.last_avail_idx = (queue.last_avail_idx - 1) & 0xFFFF
                return False
            if capture is not None:
                capture(packet[HEADER_SIZE:])
            stats = self.stats
            stats.tx_packets += 1
            stats.tx_bytes += len(packet) - HEADER_SIZE
            if len(packet) > self.max_packet:
                stats.tx_gso += 1
        queue.push(chain, 0)
        return True

    def _gather(self, chain: Chain) -> memoryview | None:
        """The chain's readable bytes as one view (copied when there are several);
        None if they are more than any packet can be."""
        readable = chain.readable
        if len(readable) == 1:
            return readable[0]
        scratch = memoryview(self._scratch)
        n = 0
        for seg in readable:
            end = n + len(seg)
            if end > len(scratch):
                return None
            scratch[n:end] = seg
            n = end
        return scratch[:n]


class RxRing:
    """One receive queue, opened for a burst of frames and closed after it.

    ``put`` copies a packet (the 12-byte header, then the frame) into the next
    buffer, or with MRG_RXBUF into as many as it needs, and sets
    ``num_buffers``; ``read_frame`` reads one frame from a tap straight into
    the next buffer. A frame that does not fit is dropped and counted; the
    buffers stay for the next frame.
    """

    def __init__(self, queue: SplitQueue, stats: NetStats) -> None:
        self.queue = queue
        self.stats = stats
        #: the driver took VIRTIO_NET_F_MRG_RXBUF
        self.mergeable = False
        #: longest packet (header included) without GSO, and with it (0: none)
        self.max_packet = HEADER_SIZE + 1514
        self.max_gso_packet = 0
        #: the driver took GUEST_CSUM (else the header's flags must read 0)
        self.guest_csum = False
        #: decides whether a frame is for this device (None: promiscuous)
        self.accept: Callable[[memoryview], bool] | None = None
        #: records every delivered frame (without its header)
        self.capture: Callable[[memoryview], None] | None = None
        #: with no room for a frame, raise ``Backpressure`` instead of dropping it
        self.hold = False
        #: chains from the framework's walk that no frame has used yet
        self.stash: list[Chain] = []
        self.is_open = False
        # The rings and the cached region during a burst; empty between bursts.
        self._avail = self._desc = self._used = self._r_view = _EMPTY
        self._r_gpa = 0
        self._r_size = 0
        self._last = 0
        self._uidx = 0
        self._count = 0
        self._mask = 0
        self._size = 0
        self._scratch = bytearray(MAX_PACKET)

    # -- a burst -----------------------------------------------------------

    def open(self) -> bool:
        """Take the ring's state for a burst; False if the queue cannot receive now."""
        queue = self.queue
        if not queue.active:
            return False
        views = ring_views(queue)
        if views is None:
            return False
        self._avail, self._desc, self._used = views
        self._r_gpa, self._r_size, self._r_view = _first_region(queue.memory)
        self._last = queue.last_avail_idx
        self._uidx = queue.used_idx
        self._count = queue.available()
        self._size = queue.size
        self._mask = queue.size - 1
        self.is_open = True
        return True

    def close(self) -> None:
        """Publish what the burst delivered and interrupt the driver once."""
        if not self.is_open:
            return
        self.is_open = False
        self._sync_out()
        self._avail = self._desc = self._used = self._r_view = _EMPTY
        self.queue.flush()

    def reset(self) -> None:
        """The driver reset the device (or went away): forget held chains."""
        self.is_open = False
        self._avail = self._desc = self._used = self._r_view = _EMPTY
        self.stash.clear()

    def room(self) -> bool:
        """Whether a buffer is available now (the ring must be open)."""
        return bool(self._count or self.stash or self._refill())

    def _sync_out(self) -> None:
        self.queue.last_avail_idx = self._last
        self.queue.used_idx = self._uidx

    def _sync_in(self) -> None:
        queue = self.queue
        self._last = queue.last_avail_idx
        self._uidx = queue.used_idx
        self._count = queue.available()

    def _refill(self) -> int:
        """Read the available index again (the driver may have added buffers)."""
        self._sync_out()
        self._count = self.queue.available()
        return self._count

    def _push(self, head: int, written: int) -> None:
        used = self._used
        slot = 1 + ((self._uidx & self._mask) << 1)
        used[slot] = head
        used[slot + 1] = written
        self._uidx = (self._uidx + 1) & 0xFFFF

    def _peek(self, ahead: int) -> tuple[int, memoryview] | None:
        """The ``ahead``-th available chain as (head, its buffer) if it is one
        device-writable descriptor in guest memory; else None."""
        head = self._avail[2 + ((self._last + ahead) & self._mask)]
        if head >= self._size:
            return None
        addr, length, flags, _ = _unpack_desc(self._desc, head << 4)
        if flags != VIRTQ_DESC_F_WRITE or length < HEADER_SIZE:
            return None
        offset = addr - self._r_gpa
        if offset < 0 or offset + length > self._r_size:
            memory = self.queue.memory
            region = memory.region_of(addr, length) if memory is not None else None
            if region is None:
                return None
            self._r_gpa, self._r_size, self._r_view = (region.spec.gpa, region.spec.size,
                                                       region.view)
            offset = addr - self._r_gpa
        return head, self._r_view[offset:offset + length]

    def _writable_run(self, start: int, k: int, room: int) -> tuple[int, tuple[int, ...]] | None:
        """(first head, buffer addresses) of the ``k`` available entries from slot
        ``start`` if their descriptors are consecutive in the table, each one
        writable buffer of at least ``room`` bytes in the cached region; else
        None. Every check is over the whole run at once."""
        first = consecutive(self._avail, start, k, self._size)
        if first < 0:
            return None
        fields = read_run(self._desc, first, k)
        addrs = fields[0::4]
        sizes = fields[1::4]
        r_gpa = self._r_gpa
        if (fields[2::4].count(VIRTQ_DESC_F_WRITE) != k or min(sizes) < room
                or min(addrs) < r_gpa or max(addrs) + max(sizes) > r_gpa + self._r_size):
            return None
        return first, addrs

    # -- frames from inside the process ------------------------------------

    def put(self, packet: memoryview | bytes | bytearray) -> int:
        """Deliver one packet (header, then frame); an ``RxStatus``, counted.

        ``num_buffers`` is set here; the rest of the header is the caller's.
        """
        if not self.is_open and not self.open():
            self.stats.rx_no_queue += 1
            return RxStatus.NO_QUEUE
        n = len(packet)
        if self._count and not self.stash:
            # The common case, inline: one writable descriptor in the cached region.
            mask = self._mask
            last = self._last
            try:
                head = self._avail[2 + (last & mask)]
                addr, length, flags, _ = _unpack_desc(self._desc, head << 4)
            except struct.error:
                length = flags = addr = head = 0  # a head past the table: the general path
            offset = addr - self._r_gpa
            if (n <= length and flags == VIRTQ_DESC_F_WRITE and offset >= 0
                    and offset + length <= self._r_size):
                view = self._r_view
                view[offset:offset + n] = packet
                view[offset + NUM_BUFFERS_OFFSET] = 1
                view[offset + NUM_BUFFERS_OFFSET + 1] = 0
                uidx = self._uidx
                slot = 1 + ((uidx & mask) << 1)
                used = self._used
                used[slot] = head
                used[slot + 1] = n
                self._uidx = (uidx + 1) & 0xFFFF
                self._last = (last + 1) & 0xFFFF
                self._count -= 1
                stats = self.stats
                stats.rx_packets += 1
                stats.rx_bytes += n - HEADER_SIZE
                if self.capture is not None:
                    self.capture(memoryview(packet)[HEADER_SIZE:])
                return RxStatus.OK
        status = self._put_chains(packet) if self.stash else self._put_spread(packet)
        stats = self.stats
        if status == RxStatus.OK:
            stats.rx_packets += 1
            stats.rx_bytes += n - HEADER_SIZE
            if self.capture is not None:
                self.capture(memoryview(packet)[HEADER_SIZE:])
        elif status == RxStatus.RING_FULL:
            if self.hold:
                raise Backpressure
            stats.rx_ring_full += 1
        elif status == RxStatus.TOO_SMALL:
            stats.rx_too_small += 1
        return status

    def put_burst(self, packets: list[memoryview], slow: Callable[[memoryview, int], None],
                  pair: int) -> int:
        """Deliver ``packets`` in order; how many were taken (fewer than all only if
        ``slow`` raised ``Backpressure``). The ring must be open.

        The common case is straight: runs of frames within the MTU without a
        partial checksum, into buffers of consecutive descriptors, checked a
        run at a time (``_put_runs``); then frame by frame, a frame of that
        kind into one writable descriptor in the cached region inline. Any
        other packet goes to ``slow(packet, pair)`` (the device's ``deliver``,
        which checks, filters and calls ``put``) with the ring state handed
        over.
        """
        done = self._put_runs(packets) if self.accept is None and not self.stash else 0
        if done == len(packets):
            return done
        return done + self._put_each(packets[done:] if done else packets, slow, pair)

    def _put_runs(self, packets: list[memoryview]) -> int:
        """Deliver the leading packets into runs of buffers whose descriptors are
        consecutive in the table, each one writable buffer in the cached region
        with room for the largest frame of the run; how many. Every check is
        over a whole run at once."""
        lengths = list(map(len, packets))
        if (min(lengths) < MIN_PACKET or max(lengths) > self.max_packet
                or (not self.guest_csum and any(map(_first_byte, packets)))):
            return 0
        total = len(packets)
        used = self._used
        r_gpa, r_view = self._r_gpa, self._r_view
        size = self._size
        capture = self.capture
        done = 0
        while done < total:
            if not self._count:
                self._refill()
            start = self._last & self._mask
            k = min(total - done, self._count, size - start)
            if k <= 0:
                break
            k = run_length(k)
            run = lengths[done:done + k]
            found = self._writable_run(start, k, max(run))
            if found is None:
                break
            first, addrs = found
            chunk = packets[done:done + k] if k < total else packets
            for addr, packet, n in zip(addrs, chunk, run, strict=True):
                offset = addr - r_gpa
                r_view[offset:offset + n] = packet
                r_view[offset + NUM_BUFFERS_OFFSET] = 1
                r_view[offset + NUM_BUFFERS_OFFSET + 1] = 0
            self._uidx = complete_run(used, self._uidx, size, first, k, run)
            self._last = (self._last + k) & 0xFFFF
            self._count -= k
            done += k
            if capture is not None:
                for packet in chunk:
                    capture(packet[HEADER_SIZE:])
        stats = self.stats
        stats.rx_packets += done
        stats.rx_bytes += sum(lengths[:done]) - done * HEADER_SIZE
        return done

    def _put_each(self, packets: list[memoryview], slow: Callable[[memoryview, int], None],
                  pair: int) -> int:
        """``put_burst`` frame by frame."""
        stats = self.stats
        # A filter, or chains held from the general path: every packet goes slowly.
        inline = self.accept is None and not self.stash
        count = self._count
        avail, desc, used = self._avail, self._desc, self._used
        r_gpa, r_size, r_view = self._r_gpa, self._r_size, self._r_view
        mask = self._mask
        size = self._size
        last, uidx = self._last, self._uidx
        max_packet = self.max_packet
        min_packet = MIN_PACKET
        capture = self.capture
        unpack = _unpack_desc
        delivered = nbytes = 0
        i = 0
        try:
            for i, packet in enumerate(packets):  # noqa: B007 - ``i`` is used below
                n = len(packet)
                if inline and count and min_packet <= n <= max_packet and not packet[0]:
                    head = avail[2 + (last & mask)]
                    if head < size:
                        addr, length, flags, _ = unpack(desc, head << 4)
                        offset = addr - r_gpa
                        if (n <= length and flags == VIRTQ_DESC_F_WRITE and offset >= 0
                                and offset + length <= r_size):
                            r_view[offset:offset + n] = packet
                            r_view[offset + NUM_BUFFERS_OFFSET] = 1
                            r_view[offset + NUM_BUFFERS_OFFSET + 1] = 0
                            slot = 1 + ((uidx & mask) << 1)
                            used[slot] = head
                            used[slot + 1] = n
                            uidx = (uidx + 1) & 0xFFFF
                            last = (last + 1) & 0xFFFF
                            count -= 1
                            delivered += 1
                            nbytes += n
                            if capture is not None:
                                capture(packet[HEADER_SIZE:])
                            continue
                self._last, self._uidx, self._count = last, uidx, count
                slow(packet, pair)
                last, uidx, count = self._last, self._uidx, self._count
                inline = self.accept is None and not self.stash
                r_gpa, r_size, r_view = self._r_gpa, self._r_size, self._r_view
            else:
                i = len(packets)
        except Backpressure:
            return i
        finally:
            if self.is_open:
                self._last, self._uidx, self._count = last, uidx, count
            stats.rx_packets += delivered
            stats.rx_bytes += nbytes - delivered * HEADER_SIZE
        return i

    def _put_spread(self, packet: memoryview | bytes | bytearray) -> int:
        """Buffers of one descriptor: as many as the frame needs (MRG_RXBUF)."""
        n = len(packet)
        spans: list[tuple[int, memoryview]] = []
        room = 0
        while room < n:
            if len(spans) >= self._count:
                self._refill()
                if len(spans) >= self._count:
                    return RxStatus.RING_FULL
            peeked = self._peek(len(spans))
            if peeked is None:
                return self._put_chains(packet)
            spans.append(peeked)
            room += len(peeked[1])
            if not self.mergeable:
                break
        if room < n:
            return RxStatus.TOO_SMALL
        src = memoryview(packet)
        done = 0
        for head, view in spans:
            take = min(len(view), n - done)
            view[:take] = src[done:done + take]
            done += take
            self._push(head, take)
        _num_buffers.pack_into(spans[0][1], NUM_BUFFERS_OFFSET, len(spans))
        self._last = (self._last + len(spans)) & 0xFFFF
        self._count -= len(spans)
        return RxStatus.OK

    def _take_chain(self) -> Chain | None:
        if self.stash:
            return self.stash.pop(0)
        self._sync_out()
        chain = self.queue.pop()
        self._sync_in()
        return chain

    def _put_chains(self, packet: memoryview | bytes | bytearray) -> int:
        """The general path: chains from the framework's walk, any layout."""
        n = len(packet)
        chains: list[Chain] = []
        room = 0
        while room < n:
            chain = self._take_chain()
            if chain is None:
                self.stash[:0] = chains
                return RxStatus.RING_FULL
            size = chain.writable_size
            if size < HEADER_SIZE:
                # Not a receive buffer at all: give it back empty.
                log.warning("queue %d: receive chain of %d writable bytes", self.queue.index,
                            size)
                self._push(chain.head, 0)
                continue
            chains.append(chain)
            room += size
            if not self.mergeable and room < n:
                self.stash[:0] = chains
                return RxStatus.TOO_SMALL
        src = memoryview(packet)
        done = 0
        for chain in chains:
            take = min(chain.writable_size, n - done)
            chain.write(src[done:done + take])
            done += take
            self._push(chain.head, take)
        chains[0].write(_num_buffers.pack(len(chains)), NUM_BUFFERS_OFFSET)
        return RxStatus.OK

    def fill(self, packet: bytes) -> int:
        """Copy ``packet`` into every buffer the driver offers now (a traffic
        source); how many. Its header is written as it is, so its
        ``num_buffers`` must read 1. Counted like ``put``."""
        if not self.is_open and not self.open():
            return 0
        n = len(packet)
        copied = 0  # by the loop below; ``put`` counts its own
        put = 0
        while self.room():
            if not self.stash:
                start = self._last & self._mask
                k = self._fill_run(packet, start)
                if k:
                    copied += k
                    continue
                desc, used = self._desc, self._used
                heads = self._avail[2 + start:2 + min(start + self._count, self._size)].tolist()
                r_gpa, r_size, view = self._r_gpa, self._r_size, self._r_view
                i = 0
                for i, head in enumerate(heads):  # noqa: B007 - ``i`` is used after the loop
                    try:
                        addr, length, flags, _ = _unpack_desc(desc, head << 4)
                    except struct.error:
                        break
                    offset = addr - r_gpa
                    if flags != VIRTQ_DESC_F_WRITE or length < n or offset < 0 \
                            or offset + length > r_size:
                        break
                    view[offset:offset + n] = packet
                else:
                    i = len(heads)
                self._uidx = complete(used, self._uidx, self._size, heads[:i], n)
                self._last = (self._last + i) & 0xFFFF
                self._count -= i
                copied += i
                if i == len(heads):
                    continue
            # A buffer that is not one descriptor in the cached region.
            if self.put(packet) != RxStatus.OK:
                break
            put += 1
        self.stats.rx_packets += copied
        self.stats.rx_bytes += copied * (n - HEADER_SIZE)
        if self.capture is not None:
            for _ in range(copied):
                self.capture(memoryview(packet)[HEADER_SIZE:])
        return copied + put

    def _fill_run(self, packet: bytes, start: int) -> int:
        """``fill`` for a run of buffers from slot ``start`` whose descriptors are
        consecutive, each one writable buffer in the cached region with room
        for ``packet``; how many (0: not such a run)."""
        size = self._size
        k = run_length(min(self._count, size - start))
        n = len(packet)
        found = self._writable_run(start, k, n)
        if found is None:
            return 0
        first, addrs = found
        r_gpa, r_view = self._r_gpa, self._r_view
        for addr in addrs:
            offset = addr - r_gpa
            r_view[offset:offset + n] = packet
        self._uidx = complete_run(self._used, self._uidx, size, first, k, n)
        self._last = (self._last + k) & 0xFFFF
        self._count -= k
        return k

    # -- frames from a tap -------------------------------------------------

    def read_frame(self, fd: int, overflow: memoryview) -> int:
        """Read one packet from ``fd`` (a tap with a 12-byte vnet header) into the
        next buffer; an ``RxStatus``, counted. ``overflow`` takes what does not fit.

        With no buffer nothing is read: the frame waits in the tap's queue.
        """
        if not self.is_open and not self.open():
            return RxStatus.NO_QUEUE
        if not self.room():
            return RxStatus.RING_FULL
        peeked = None if self.stash else self._peek(0)
        if peeked is None:
            return self._read_into_chain(fd, overflow)
        head, view = peeked
        length = len(view)
        try:
            n = os.readv(fd, [view, overflow])
        except BlockingIOError:
            return RxStatus.EMPTY
        if n > length:
            # Longer than the first buffer: assemble it, then spread it.
            scratch = memoryview(self._scratch)
            scratch[:length] = view
            scratch[length:n] = overflow[:n - length]
            return self._deliver_read(scratch[:n])
        packet = view[:n]
        if not self._admit(packet):
            return RxStatus.DROPPED
        _num_buffers.pack_into(view, NUM_BUFFERS_OFFSET, 1)
        self._push(head, n)
        self._last = (self._last + 1) & 0xFFFF
        self._count -= 1
        stats = self.stats
        stats.rx_packets += 1
        stats.rx_bytes += n - HEADER_SIZE
        if self.capture is not None:
            self.capture(packet[HEADER_SIZE:])
        return RxStatus.OK

    def _read_into_chain(self, fd: int, overflow: memoryview) -> int:
        """A buffer that is not one descriptor: read, then copy with ``put``."""
        chain = self._take_chain()
        if chain is None:
            return RxStatus.RING_FULL
        self.stash.insert(0, chain)  # ``put`` takes it again
        try:
            n = os.readv(fd, [*chain.writable, overflow])
        except BlockingIOError:
            return RxStatus.EMPTY
        scratch = memoryview(self._scratch)
        done = 0
        for seg in chain.writable:
            take = min(len(seg), n - done)
            scratch[done:done + take] = seg[:take]
            done += take
        if n > done:
            scratch[done:n] = overflow[:n - done]
        return self._deliver_read(scratch[:n])

    def _deliver_read(self, packet: memoryview) -> int:
        if not self._admit(packet):
            return RxStatus.DROPPED
        status = self.put(packet)
        return RxStatus.OK if status == RxStatus.OK else RxStatus.DROPPED

    def _admit(self, packet: memoryview) -> bool:
        """Drop (and count) a frame read from outside that the driver must not
        see; clear the header's flags when the driver cannot take them."""
        n = len(packet)
        stats = self.stats
        if n > self.max_packet:
            if n > self.max_gso_packet or not packet[1]:
                stats.rx_oversize += 1
                return False
            stats.rx_gso += 1
        if n < HEADER_SIZE + 14:
            stats.rx_errors += 1
            return False
        if self.accept is not None and not self.accept(packet):
            stats.rx_filtered += 1
            return False
        if not self.guest_csum:
            packet[0] = 0
        return True


def is_dropped_frame_error(exc: OSError) -> bool:
    """A write the kernel refused for this frame alone (a bad GSO header, say)."""
    return exc.errno in _DROPPED_FRAME
