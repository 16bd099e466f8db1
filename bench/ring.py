"""A fast virtio-blk driver loop over one split ring set up by ``VhostUserDriver``.

``DriverQueue`` builds a chain per request (dataclasses, lists, a dict); that
costs more than the back-ends we want to measure. Here every request slot owns a
fixed indirect table (header, data, status), written once per workload, and the
ring descriptor ``slot`` always points at table ``slot``. Submitting a request
is then: store the sector in the slot's header, reset its status byte, put the
slot in the avail ring. The avail index is published and the device kicked
once per batch (when event-idx or the NO_NOTIFY flag says it wants a kick);
completions are collected in batches after a wait on the call eventfd, or an
optional bounded busy-poll of the used index.

Requests use indirect descriptors, as Linux's virtio-blk does when the device
offers them: a queue of 256 then holds 256 requests of three buffers each.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

from outboard.backend.virtqueue.split import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_fence,
)
from outboard.testing import VhostUserDriver

__all__ = ["BLK_T_FLUSH", "BLK_T_IN", "BLK_T_OUT", "BlkRing", "PhaseResult"]

BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
SECTOR = 512
TABLE_BYTES = 3 * 16
STATUS_UNSET = 0xFF

_desc = struct.Struct("<QIHH")
_ONE = (1).to_bytes(8, "little")


@dataclass
class PhaseResult:
    """What one timed phase of the loop saw."""

    completed: int = 0
    errors: int = 0
    bytes: int = 0
    kicks: int = 0
    sleeps: int = 0  # blocking reads of the call eventfd
    batches: int = 0  # completion batches collected
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)


class BlkRing:
    """Request slots over queue ``index`` of a started ``VhostUserDriver``."""

    def __init__(self, driver: VhostUserDriver, slots: int, block_max: int,
                 *, index: int = 0) -> None:
        q = driver.queues[index]
        ram = driver.ram
        if slots > q.size:
            raise ValueError(f"{slots} slots do not fit a ring of {q.size}")
        self.size = size = q.size
        self.slots = slots
        self.block_max = block_max
        self.event_idx = q.event_idx
        self.kick_fd = driver.kicks[index].fd
        self.call_fd = driver.calls[index].fd
        os.set_blocking(self.call_fd, True)
        self._avail_h = ram.view(q.avail_gpa, 6 + 2 * size).cast("H")
        used = ram.view(q.used_gpa, 6 + 8 * size)
        self._used_h = used.cast("H")
        self._used_i = used[:4 + 8 * size].cast("I")  # element i: id at 1 + 2 * i
        self.ram = ram

        self.table_gpa = ram.alloc(slots * TABLE_BYTES, 16)
        self.header_gpa = ram.alloc(slots * 16, 16)
        self.status_gpa = ram.alloc(slots, 16)
        self.data_gpa = ram.alloc(slots * block_max, 4096)
        self._tables = ram.view(self.table_gpa, slots * TABLE_BYTES)
        self._headers_q = ram.view(self.header_gpa, slots * 16).cast("Q")
        self._status = ram.view(self.status_gpa, slots)
        # Something other than zeros for the writes to carry.
        data = ram.view(self.data_gpa, slots * block_max)
        chunk = os.urandom(1 << 20)
        for off in range(0, len(data), len(chunk)):
            n = min(len(chunk), len(data) - off)
            data[off:off + n] = chunk[:n]
        desc = ram.view(q.desc_gpa, 16 * size)
        for slot in range(slots):
            _desc.pack_into(desc, 16 * slot, self.table_gpa + slot * TABLE_BYTES, TABLE_BYTES,
                            VIRTQ_DESC_F_INDIRECT, 0)

        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(slots - 1, -1, -1))
        self.inflight = 0
        self.submit_ns = [0] * slots
        self.block_size = 0
        self.kind = BLK_T_IN
        self._sectors: list[int] = [0]
        self._pos = 0
        if not self.event_idx:
            self._avail_h[0] = 1  # VIRTQ_AVAIL_F_NO_INTERRUPT until we sleep

    def prepare(self, kind: int, block_size: int, sectors: list[int]) -> None:
        """Lay out every slot's table for requests of ``kind`` and ``block_size`` bytes;
        requests take their sectors from ``sectors`` in order, round and round."""
        if self.inflight:
            raise RuntimeError("prepare with requests in flight")
        if block_size > self.block_max:
            raise ValueError(f"block of {block_size} bytes > {self.block_max}")
        data_flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if kind == BLK_T_IN else 0)
        tables = self._tables
        for slot in range(self.slots):
            base = slot * TABLE_BYTES
            _desc.pack_into(tables, base, self.header_gpa + 16 * slot, 16, VIRTQ_DESC_F_NEXT, 1)
            _desc.pack_into(tables, base + 16, self.data_gpa + slot * self.block_max, block_size,
                            data_flags, 2)
            _desc.pack_into(tables, base + 32, self.status_gpa + slot, 1, VIRTQ_DESC_F_WRITE, 0)
            self._headers_q[2 * slot] = kind  # type, reserved = 0
        self.kind = kind
        self.block_size = block_size
        self._sectors = sectors
        self._pos = 0

    def run(self, seconds: float, qd: int, *, spin_ns: int = 0, submit: bool = True,
            record_latency: bool = True, limit: int = -1) -> PhaseResult:
        """Keep ``qd`` requests in flight for ``seconds`` (or until ``limit`` requests
        were submitted); with ``submit=False``, only wait for the ones in flight."""
        if qd > self.slots:
            raise ValueError(f"queue depth {qd} > {self.slots} slots")
        res = PhaseResult()
        lat = res.latencies_ns
        record = lat.append if record_latency else None
        # Everything the loop touches, as locals.
        avail_h = self._avail_h
        used_h = self._used_h
        used_i = self._used_i
        status = self._status
        headers_q = self._headers_q
        submit_ns = self.submit_ns
        free = self.free
        sectors = self._sectors
        nsect = len(sectors)
        pos = self._pos
        mask = self.size - 1
        event_idx = self.event_idx
        used_event_at = 2 + self.size  # in avail_h
        avail_event_at = 2 + 4 * self.size  # in used_h
        kick_fd = self.kick_fd
        call_fd = self.call_fd
        avail_idx = self.avail_idx
        last_used = self.last_used
        inflight = self.inflight
        slots = self.slots
        clock = time.perf_counter_ns
        write = os.write
        read = os.read
        fence = full_fence
        completed = errors = kicks = sleeps = batches = 0

        started = clock()
        deadline = started + int(seconds * 1e9)
        while True:
            now = clock()
            if submit:
                if now >= deadline:
                    break  # what is in flight stays in flight, for the next phase
                if limit == 0:
                    submit = False  # wait for what is in flight, then stop
                    continue
                want = qd - inflight
                if limit > 0:
                    want = min(want, limit)
                    limit -= want
                if want > 0:
                    old = avail_idx
                    for _ in range(want):
                        slot = free.pop()
                        headers_q[2 * slot + 1] = sectors[pos]
                        pos += 1
                        if pos == nsect:
                            pos = 0
                        status[slot] = STATUS_UNSET
                        submit_ns[slot] = now
                        avail_h[2 + (avail_idx & mask)] = slot
                        avail_idx = (avail_idx + 1) & 0xFFFF
                    inflight += want
                    avail_h[1] = avail_idx
                    # The index store must be visible before we read the device's
                    # wish (2.7.10), as the device's avail_event store before it
                    # reads the index again.
                    fence()
                    if event_idx:
                        # vring_need_event(avail_event, new, old)
                        kick = ((avail_idx - used_h[avail_event_at] - 1) & 0xFFFF) < (
                            (avail_idx - old) & 0xFFFF)
                    else:
                        kick = not used_h[0] & 1  # VIRTQ_USED_F_NO_NOTIFY
                    if kick:
                        write(kick_fd, _ONE)
                        kicks += 1
            elif inflight == 0:
                break
            # Wait for at least one completion.
            if used_h[1] == last_used:
                if spin_ns:
                    spin_end = clock() + spin_ns
                    while used_h[1] == last_used and clock() < spin_end:
                        pass
                while used_h[1] == last_used:
                    # Ask for an interrupt, then look again: the device may have
                    # published before it could see the request.
                    if event_idx:
                        avail_h[used_event_at] = last_used
                    else:
                        avail_h[0] = 0
                    fence()
                    if used_h[1] != last_used:
                        break
                    read(call_fd, 8)
                    sleeps += 1
                if not event_idx:
                    avail_h[0] = 1
                # With event-idx the used_event just written goes stale as soon as
                # the device passes it: no more interrupts until we sleep again.
            end = used_h[1]
            now = clock()
            batches += 1
            while last_used != end:
                slot = used_i[1 + 2 * (last_used & mask)]
                if status[slot]:
                    errors += 1
                if record is not None:
                    record(now - submit_ns[slot])
                free.append(slot)
                last_used = (last_used + 1) & 0xFFFF
                completed += 1
            inflight = slots - len(free)

        res.seconds = (clock() - started) / 1e9
        self.avail_idx = avail_idx
        self.last_used = last_used
        self.inflight = inflight
        self._pos = pos
        res.completed = completed
        res.errors = errors
        res.bytes = completed * self.block_size
        res.kicks = kicks
        res.sleeps = sleeps
        res.batches = batches
        return res

    def roundtrip(self, sector: int) -> str | None:
        """Write 4 KiB of random bytes at ``sector``, read them back: why that failed,
        or None. A back-end that answers OK without moving data fails here."""
        pattern = os.urandom(4096)
        slot = self.free[-1]  # the slot the next request takes
        data = self.ram.view(self.data_gpa + slot * self.block_max, 4096)
        data[:] = pattern
        self.prepare(BLK_T_OUT, 4096, [sector])
        res = self.run(10, 1, limit=1)
        if res.completed != 1 or res.errors:
            return f"a write of 4 KiB at sector {sector} failed"
        data[:] = bytes(4096)
        self.prepare(BLK_T_IN, 4096, [sector])
        res = self.run(10, 1, limit=1)
        if res.completed != 1 or res.errors:
            return f"a read of 4 KiB at sector {sector} failed"
        if self.free[-1] != slot or bytes(data) != pattern:
            return f"reading sector {sector} did not return what was written there"
        return None

    def drain(self) -> PhaseResult:
        """Wait for every request in flight."""
        return self.run(0, 0, submit=False, record_latency=False)
