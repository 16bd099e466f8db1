"""The driver side of a split virtqueue: offer chains, collect completions.

Independent of any transport: it needs guest RAM and, to notify, a callable.
Tests use it against ``SplitQueue`` directly, and the front-ends use it to
drive a back-end over a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..backend.virtqueue.split import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    need_event,
    ring_sizes,
)
from .ram import GuestRam

__all__ = ["Buffer", "DriverQueue", "Used"]

_desc = struct.Struct("<QIHH")
_used_elem = struct.Struct("<II")


@dataclass(frozen=True)
class Buffer:
    """One descriptor: ``size`` bytes at ``gpa``, device-writable or not."""

    gpa: int
    size: int
    writable: bool = False


@dataclass(frozen=True)
class Used:
    head: int
    written: int


class DriverQueue:
    """One split ring laid out in ``ram``; the driver's bookkeeping for it."""

    def __init__(self, ram: GuestRam, size: int, *, event_idx: bool = False) -> None:
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        desc_size, avail_size, used_size = ring_sizes(size)
        self.desc_gpa = ram.alloc(desc_size, 16)
        self.avail_gpa = ram.alloc(avail_size, 2)
        self.used_gpa = ram.alloc(used_size, 4)
        for gpa, n in ((self.desc_gpa, desc_size), (self.avail_gpa, avail_size),
                       (self.used_gpa, used_size)):
            ram.write(gpa, bytes(n))
        self._desc = ram.view(self.desc_gpa, desc_size)
        self._avail_h = ram.view(self.avail_gpa, avail_size, "H")
        self._used = ram.view(self.used_gpa, used_size)
        self._used_h = ram.view(self.used_gpa, used_size, "H")
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used_idx = 0
        self.in_flight: dict[int, list[int]] = {}  # head -> descriptor indices
        self.indirect_tables: dict[int, int] = {}  # head -> table gpa (kept for reuse)

    # -- offering ----------------------------------------------------------

    def write_desc(self, index: int, gpa: int, size: int, flags: int, next_index: int) -> None:
        _desc.pack_into(self._desc, index * 16, gpa, size, flags, next_index)

    def add(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        """Place a chain (readable buffers first) and return its head; not yet visible."""
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            if not self.free:
                raise IndexError("ring full")
            head = self.free.pop()
            table = self.ram.alloc(16 * len(buffers), 16)
            entries = bytearray(16 * len(buffers))
            for i, buf in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if buf.writable else 0)
                if i + 1 < len(buffers):
                    flags |= VIRTQ_DESC_F_NEXT
                _desc.pack_into(entries, i * 16, buf.gpa, buf.size, flags, i + 1)
            self.ram.write(table, bytes(entries))
            self.write_desc(head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT, 0)
            self.in_flight[head] = [head]
            return head
        if len(buffers) > len(self.free):
            raise IndexError("ring full")
        indices = [self.free.pop() for _ in buffers]
        for i, buf in enumerate(buffers):
            flags = VIRTQ_DESC_F_WRITE if buf.writable else 0
            nxt = 0
            if i + 1 < len(buffers):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = indices[i + 1]
            self.write_desc(indices[i], buf.gpa, buf.size, flags, nxt)
        self.in_flight[indices[0]] = indices
        return indices[0]

    def make_available(self, head: int) -> None:
        """Put ``head`` in the avail ring (the index is published by ``publish``)."""
        self._avail_h[2 + (self.avail_idx % self.size)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Publish the avail index; True if the device asked to be kicked."""
        old = self._avail_h[1]
        self._avail_h[1] = self.avail_idx
        if self.event_idx:
            avail_event = self._used_h[2 + 4 * self.size]
            return need_event(avail_event, self.avail_idx, old)
        return not self._used_h[0] & 1

    def offer(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        head = self.add(buffers, indirect=indirect)
        self.make_available(head)
        return head

    # -- completions -------------------------------------------------------

    @property
    def device_used_idx(self) -> int:
        return int(self._used_h[1])

    def pending_used(self) -> int:
        return (self.device_used_idx - self.last_used_idx) & 0xFFFF

    def collect(self) -> list[Used]:
        """Every completion the device published since the last call."""
        out: list[Used] = []
        end = self.device_used_idx
        while self.last_used_idx != end:
            slot = self.last_used_idx % self.size
            head, written = _used_elem.unpack_from(self._used, 4 + slot * 8)
            out.append(Used(head, written))
            self.free.extend(self.in_flight.pop(head, []))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        """Ask for an interrupt once the used index passes ``value`` (event-idx)."""
        self._avail_h[2 + self.size] = value & 0xFFFF

    def suppress_interrupts(self, suppress: bool) -> None:
        self._avail_h[0] = 1 if suppress else 0
