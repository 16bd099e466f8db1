"""The device side of a split virtqueue (virtio 1.2, section 2.7).

Hot path rules: descriptors are read with one precompiled ``struct`` unpack,
ring indices through ``memoryview.cast('H')``; the used index is published and
the driver notified once per batch, not once per request.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterator

from ..errors import ChainError, GuestMemoryError
from ..memory import GuestMemory
from .chain import Chain

__all__ = ["MAX_QUEUE_SIZE", "SplitQueue", "need_event"]

log = logging.getLogger("outboard.virtqueue")

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# An indirect table may hold more entries than the ring; bound it all the same.
MAX_INDIRECT_COUNT = 4096

_desc = struct.Struct("<QIHH")
_unpack_desc = _desc.unpack_from
_pack_used = struct.Struct("<II").pack_into

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A store-load barrier: a locked instruction on every architecture CPython runs on.

    Needed where we write one ring field and then read another that the driver
    writes (virtio 1.2, 2.7.10 "Virtqueue Notification Suppression"): without it
    our store may still sit in the store buffer while we read a stale value.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event: did the index move past ``event_idx`` going from old to new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail ring and used ring (with event fields)."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class SplitQueue:
    """One split virtqueue as the device sees it.

    Life cycle: ``set_size``, ``setup`` with the ring addresses, ``last_avail_idx``
    set from the front-end's base, then ``pop`` / ``push`` / ``publish`` while it
    runs. ``reset`` forgets the rings.
    """

    def __init__(self, index: int, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.index = index
        self.max_size = max_size
        self.size = max_size
        self.memory: GuestMemory | None = None
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.broken = False
        self.failed_chains = 0
        # Called after a chain is refused (the runtime writes the err eventfd).
        self.on_error: Callable[[SplitQueue, str], None] | None = None
        #: interrupts the driver; set by the runtime while the queue runs
        self.notifier: Callable[[], None] | None = None
        #: vhost-user "started but disabled" rings are not processed
        self.enabled = True
        #: how many chains ``pop_batch`` hands out at once: the runtime publishes
        #: and interrupts after each batch, so the driver can reap and refill
        #: while the device works on the next one
        self.batch_limit = 32
        self._signalled_used = 0
        self._signalled_valid = False
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._avail_h: memoryview | None = None
        self._used_h: memoryview | None = None

    # -- configuration -----------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._desc is not None

    @property
    def active(self) -> bool:
        """Running, enabled and sound: a device may use it from its own tasks."""
        return self.notifier is not None and self.enabled and not self.broken \
            and self._desc is not None

    def ring_views(self) -> tuple[memoryview, memoryview, memoryview] | None:
        """(available ring as u16, descriptor table, used ring) while the rings are set.

        For a device with a hot path of its own (net's bursts): it reads
        descriptors and writes used entries itself, then sets ``last_avail_idx``
        and ``used_idx`` and calls ``flush``. Use the views for one batch only.
        """
        if self._avail_h is None or self._desc is None or self._used is None:
            return None
        return self._avail_h, self._desc, self._used

    def flush(self) -> None:
        """Publish pushed entries and interrupt if the driver wants it.

        The runtime does this after each ``process`` call; a device that
        completes requests from its own tasks (received frames, say) calls it.
        """
        if self.publish() and self.notifier is not None:
            self.notifier()

    def set_size(self, size: int) -> None:
        if not 0 < size <= self.max_size or size & (size - 1):
            raise ChainError(
                f"queue {self.index}: size {size} is not a power of two up to {self.max_size}")
        self.size = size

    def set_features(self, *, event_idx: bool, indirect: bool) -> None:
        self.event_idx = event_idx
        self.indirect = indirect

    def setup(self, memory: GuestMemory, desc_gpa: int, avail_gpa: int, used_gpa: int) -> None:
        """Point the queue at its rings (guest-physical addresses)."""
        desc_size, avail_size, used_size = ring_sizes(self.size)
        for name, gpa, align in (("descriptor table", desc_gpa, 16),
                                 ("available ring", avail_gpa, 2), ("used ring", used_gpa, 4)):
            if gpa % align:
                raise GuestMemoryError(
                    f"queue {self.index}: {name} at {gpa:#x} is not {align}-byte aligned")
        desc = memory.view(desc_gpa, desc_size)
        avail = memory.view(avail_gpa, avail_size)
        used = memory.view(used_gpa, used_size)
        self.memory = memory
        self._desc, self._avail, self._used = desc, avail, used
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._signalled_valid = False
        self.broken = False

    def sync_used_idx(self) -> None:
        """Take the used index from the ring (on start, the driver's view is the truth)."""
        assert self._used_h is not None
        self.used_idx = self._used_h[1]
        self._signalled_used = self.used_idx

    def resume(self, last_avail_idx: int, used_idx: int) -> None:
        """Take over positions another process left the ring in. Whether the
        driver was interrupted for the last entries is not known: the next
        publish interrupts if there is anything new (a spurious interrupt at
        worst, never a lost one)."""
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = used_idx & 0xFFFF
        self._signalled_valid = False

    def release(self) -> None:
        """Forget the rings (the memory table is going away, or the device resets)."""
        for view in (self._avail_h, self._used_h, self._desc, self._avail, self._used):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used = self._avail_h = self._used_h = None
        self.memory = None

    def reset(self) -> None:
        self.release()
        self.size = self.max_size
        self.last_avail_idx = 0
        self.used_idx = 0
        self.event_idx = self.indirect = False
        self.broken = False
        self._signalled_valid = False

    # -- the data path -----------------------------------------------------

    def available(self) -> int:
        """How many chains the driver has offered that we have not popped."""
        if self._avail_h is None or self.broken:
            return 0
        count = (self._avail_h[1] - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            self._break(f"driver moved the available index by {count} on a ring of {self.size}")
            return 0
        return count

    def pop(self) -> Chain | None:
        """The next well-formed chain, or None when the ring is drained.

        A malformed chain is logged, returned to the driver with length 0 and
        skipped: that request fails, the queue goes on.
        """
        batch = self.pop_batch(1)
        return batch[0] if batch else None

    def pop_batch(self, limit: int | None = None) -> list[Chain]:
        """Up to ``limit`` (default ``batch_limit``) well-formed chains available now.

        The hot path of every device. Chains whose buffers all lie in the
        region of the last lookup, directly or through one indirect table, are
        walked inline with everything in locals; any other chain, and any chain
        that breaks a rule, is walked again by ``_walk``, which names the fault.
        """
        avail_h = self._avail_h
        out: list[Chain] = []
        if avail_h is None or self.broken or self.memory is None:
            return out
        last = self.last_avail_idx
        pending = (avail_h[1] - last) & 0xFFFF
        if pending > self.size:
            self._break(f"driver moved the available index by {pending} on a ring of {self.size}")
            return out
        if not pending:
            return out
        if limit is None:
            limit = self.batch_limit
        size = self.size
        mask = size - 1
        desc = self._desc
        assert desc is not None
        indirect_ok = self.indirect
        region = self.memory.last_region()
        r_gpa = region.spec.gpa
        r_size = region.spec.size
        r_view = region.view
        unpack = _unpack_desc
        append = out.append
        for _ in range(min(pending, limit)):
            head = avail_h[2 + (last & mask)]
            last = (last + 1) & 0xFFFF
            if head < size:
                table = desc
                count = size
                index = head
                steps = 0
                readable: list[memoryview] = []
                writable: list[memoryview] = []
                while True:
                    addr, length, flags, nxt = unpack(table, index << 4)
                    offset = addr - r_gpa
                    if offset < 0 or offset + length > r_size or not length:
                        break
                    if flags & 4:  # VIRTQ_DESC_F_INDIRECT, alone, first, not nested
                        if (flags & 1 or steps or table is not desc or not indirect_ok
                                or length & 15 or length > MAX_INDIRECT_COUNT * 16):
                            break
                        table = r_view[offset:offset + length]
                        count = length >> 4
                        index = 0
                        steps = 1
                        continue
                    if flags & 2:
                        writable.append(r_view[offset:offset + length])
                    elif writable:
                        break
                    else:
                        readable.append(r_view[offset:offset + length])
                    if not flags & 1:
                        append(Chain(head, readable, writable))
                        head = -1
                        break
                    index = nxt
                    steps += 1
                    if index >= count or steps > count:
                        break
                if head < 0:
                    continue
            try:
                append(self._walk(head))
            except (ChainError, GuestMemoryError) as exc:
                self.last_avail_idx = last
                self._refuse(head, str(exc))
            region = self.memory.last_region()
            r_gpa, r_size, r_view = region.spec.gpa, region.spec.size, region.view
        self.last_avail_idx = last
        return out

    def __iter__(self) -> Iterator[Chain]:
        """Drain the ring: every chain available now (and any that arrive meanwhile)."""
        while batch := self.pop_batch(MAX_QUEUE_SIZE):
            yield from batch

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise ChainError(f"head index {head} out of range")
        memory = self.memory
        assert memory is not None and self._desc is not None
        # The region of the last lookup, cached in locals: almost every buffer
        # of a chain lies in the same region as the one before.
        region = memory.last_region()
        r_gpa = region.spec.gpa
        r_size = region.spec.size
        r_view = region.view
        table = self._desc
        table_count = size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        index = head
        seen = 0
        indirect_done = False
        while True:
            if index >= table_count:
                raise ChainError(f"next index {index} out of range (table of {table_count})")
            seen += 1
            if seen > table_count:
                raise ChainError("descriptor loop")
            addr, length, flags, nxt = _unpack_desc(table, index * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3.1: the table is in a descriptor of its own, not nested,
                # and never chained with NEXT.
                if not self.indirect:
                    raise ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if indirect_done or table is not self._desc:
                    raise ChainError("nested indirect descriptor")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT_COUNT:
                    raise ChainError(f"indirect table of {length} bytes")
                table = memory.view(addr, length)
                table_count = length // DESC_SIZE
                indirect_done = True
                index = 0
                seen = 0
                continue
            if length == 0:
                raise ChainError(f"zero-length descriptor {index}")
            offset = addr - r_gpa
            if offset >= 0 and offset + length <= r_size:
                view = r_view[offset:offset + length]
            else:
                view = memory.view(addr, length)
                region = memory.last_region()
                r_gpa, r_size, r_view = region.spec.gpa, region.spec.size, region.view
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(view)
            elif writable:
                raise ChainError("device-readable descriptor after a device-writable one")
            else:
                readable.append(view)
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            index = nxt

    def _refuse(self, head: int, reason: str) -> None:
        self.failed_chains += 1
        log.warning("queue %d: refused chain at head %d: %s", self.index, head, reason)
        if head < self.size:
            self.push_head(head, 0)
        if self.on_error is not None:
            self.on_error(self, reason)

    def _break(self, reason: str) -> None:
        if not self.broken:
            self.broken = True
            log.error("queue %d: stopped: %s", self.index, reason)
            if self.on_error is not None:
                self.on_error(self, reason)

    def push(self, chain: Chain, written: int) -> None:
        """Give ``chain`` back with ``written`` bytes filled; visible at the next publish."""
        self.push_head(chain.head, written)

    def push_head(self, head: int, written: int) -> None:
        assert self._used is not None
        idx = self.used_idx
        _pack_used(self._used, 4 + (idx & (self.size - 1)) * 8, head, written)
        self.used_idx = (idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed entries visible; True if the driver wants an interrupt for them."""
        used_h = self._used_h
        avail_h = self._avail_h
        if used_h is None or avail_h is None:
            return False
        new = self.used_idx
        if used_h[1] != new:
            used_h[1] = new
        # 2.7.10: the used index store must be visible before we read used_event.
        full_fence()
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if old == new:
            return False  # nothing new since the last check (or since the start)
        if self.event_idx:
            if not valid:
                return True
            return need_event(avail_h[2 + self.size], new, old)
        return not avail_h[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_kicks(self) -> bool:
        """Ask the driver to kick for the next chain; True if chains are already waiting.

        With event-idx the device writes avail_event (2.7.10); then the ring is
        read again, so a chain added while we were writing is not missed.
        """
        used_h = self._used_h
        avail_h = self._avail_h
        if used_h is None or avail_h is None or self.broken:
            return False
        if self.event_idx:
            used_h[2 + 4 * self.size] = self.last_avail_idx
            full_fence()
        return avail_h[1] != self.last_avail_idx
