"""MSI-X in the device: the vector table, the pending bit array, and delivery.

The table and the PBA are MMIO in a BAR (PCI 3.0, 6.8.2). Each vector has a
message address, message data and vector control, whose bit 0 is the mask bit;
message control in the capability has the MSI-X enable and function mask bits.
Each vector is delivered by writing its own irqfd eventfd, given by the
vfio-user client with SET_IRQS (the client turns it into the message).

A vector is *deliverable* when MSI-X is enabled, the function is not masked,
its own mask bit is clear, the client has not masked it (SET_IRQS MASK) and it
has an eventfd. ``trigger`` delivers a deliverable vector at once; any other
vector gets its pending bit set instead and no eventfd is written. Whatever
makes a pending vector deliverable again (a table write clearing its mask bit,
the function mask or enable bit, SET_IRQS UNMASK, a new eventfd) delivers it
once and clears the bit ("6.8.2.9 Vector Control for MSI-X Table Entries").
``withdraw`` clears a pending bit whose reason is gone.

Giving a vector an eventfd clears its mask bit and taking the eventfd away sets
it: this is what the host kernel does to a physical function's table when
VFIO_DEVICE_SET_IRQS assigns or releases a vector, and it is what lets a
client that keeps the guest's table to itself (QEMU never forwards table
writes, only PBA reads) use vectors at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ..fd import OwnedFd

__all__ = ["ENTRY_SIZE", "MAX_VECTORS", "Msix"]

log = logging.getLogger("outboard.msix")

ENTRY_SIZE = 16
MAX_VECTORS = 2048
#: offsets in a table entry
ADDRESS_LO = 0
ADDRESS_HI = 4
DATA = 8
VECTOR_CONTROL = 12
MASK_BIT = 1
#: message control bits (in the capability, offset 2)
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14

_ONE = (1).to_bytes(8, "little")


class Msix:
    """The MSI-X state of one function with ``count`` vectors."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= MAX_VECTORS:
            raise ValueError(f"{count} MSI-X vectors (1 to {MAX_VECTORS})")
        self.count = count
        self.enabled = False
        self.function_masked = False
        self._table = bytearray(ENTRY_SIZE * count)
        self._pending = 0
        self._client_masked = 0
        self._fds: list[OwnedFd | None] = [None] * count
        #: eventfd writes per vector, for tests and statistics
        self.delivered = [0] * count
        self.reset()

    # -- sizes -------------------------------------------------------------

    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.count

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA: one bit per vector in whole QWORDs."""
        return 8 * ((self.count + 63) // 64)

    # -- state -------------------------------------------------------------

    def reset(self) -> None:
        """The function was reset: MSI-X off, every vector masked, nothing pending.

        The eventfds stay: they belong to the client's setup, not to the device.
        """
        self.enabled = False
        self.function_masked = False
        self._table[:] = bytes(len(self._table))
        for vector in range(self.count):
            self._table[vector * ENTRY_SIZE + VECTOR_CONTROL] = MASK_BIT
        self._pending = 0
        self._client_masked = 0

    def _check(self, vector: int) -> None:
        if not 0 <= vector < self.count:
            raise ValueError(f"MSI-X vector {vector} (the function has {self.count})")

    def table_masked(self, vector: int) -> bool:
        return bool(self._table[vector * ENTRY_SIZE + VECTOR_CONTROL] & MASK_BIT)

    def client_masked(self, vector: int) -> bool:
        return bool(self._client_masked >> vector & 1)

    def masked(self, vector: int) -> bool:
        """Would a message for ``vector`` be held back now?"""
        self._check(vector)
        return (not self.enabled or self.function_masked or self.table_masked(vector)
                or self.client_masked(vector) or self._fds[vector] is None)

    def pending(self, vector: int) -> bool:
        self._check(vector)
        return bool(self._pending >> vector & 1)

    def address(self, vector: int) -> int:
        base = vector * ENTRY_SIZE
        return int.from_bytes(self._table[base:base + 8], "little")

    def data(self, vector: int) -> int:
        base = vector * ENTRY_SIZE + DATA
        return int.from_bytes(self._table[base:base + 4], "little")

    # -- raising -----------------------------------------------------------

    def trigger(self, vector: int) -> bool:
        """The device raises ``vector``: deliver it, or set its pending bit.

        Returns whether an eventfd was written.
        """
        if self.masked(vector):
            self._pending |= 1 << vector
            return False
        self._deliver(vector)
        return True

    def withdraw(self, vector: int) -> None:
        """Forget a pending ``vector`` whose reason is gone (nothing is sent)."""
        self._check(vector)
        self._pending &= ~(1 << vector)

    def _deliver(self, vector: int) -> None:
        fd = self._fds[vector]
        assert fd is not None
        self.delivered[vector] += 1
        try:
            os.write(fd.fd, _ONE)
        except BlockingIOError:
            pass  # the counter is saturated: a wake-up is pending anyway

    def _flush(self, vectors: Sequence[int] | range) -> None:
        """Deliver every pending vector of ``vectors`` that is deliverable now."""
        if not self._pending:
            return
        for vector in vectors:
            if self._pending >> vector & 1 and not self.masked(vector):
                self._pending &= ~(1 << vector)
                self._deliver(vector)

    # -- message control (the capability) -----------------------------------

    @property
    def control(self) -> int:
        """Message control: table size, function mask and enable (6.8.2.3)."""
        return ((self.count - 1) | (CONTROL_FUNCTION_MASK if self.function_masked else 0)
                | (CONTROL_ENABLE if self.enabled else 0))

    def set_control(self, value: int) -> None:
        self.enabled = bool(value & CONTROL_ENABLE)
        self.function_masked = bool(value & CONTROL_FUNCTION_MASK)
        self._flush(range(self.count))

    # -- the table and the PBA (MMIO) ----------------------------------------

    def read_table(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.table_size:
            return bytes(size)
        return bytes(self._table[offset:offset + size])

    def write_table(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.table_size:
            log.warning("MSI-X table write of %d bytes at %#x is outside the table",
                        len(data), offset)
            return
        first = offset // ENTRY_SIZE
        last = (offset + len(data) - 1) // ENTRY_SIZE
        for i, value in enumerate(data, offset):
            if i % ENTRY_SIZE >= VECTOR_CONTROL + 1:
                continue  # reserved bits of vector control read as zero
            if i % ENTRY_SIZE == VECTOR_CONTROL:
                value &= MASK_BIT
            self._table[i] = value
        self._flush(range(first, last + 1))

    def read_pba(self, offset: int, size: int) -> bytes:
        """The pending bits; "Software should never write ... Pending Bits"."""
        pba = self._pending.to_bytes(self.pba_size, "little")
        if offset < 0 or offset + size > self.pba_size:
            return bytes(size)
        return pba[offset:offset + size]

    # -- the client's side (vfio-user SET_IRQS) ------------------------------

    def set_eventfd(self, vector: int, fd: OwnedFd | None) -> None:
        """Give ``vector`` a new eventfd (taking ownership) or take it away."""
        self._check(vector)
        old, self._fds[vector] = self._fds[vector], fd
        if old is not None and old is not fd:
            old.close()
        control = vector * ENTRY_SIZE + VECTOR_CONTROL
        if fd is None:
            self._table[control] |= MASK_BIT
        else:
            self._table[control] &= ~MASK_BIT
            self._flush((vector,))

    def eventfd(self, vector: int) -> OwnedFd | None:
        self._check(vector)
        return self._fds[vector]

    def client_mask(self, vector: int) -> None:
        self._check(vector)
        self._client_masked |= 1 << vector

    def client_unmask(self, vector: int) -> None:
        self._check(vector)
        self._client_masked &= ~(1 << vector)
        self._flush((vector,))

    def close(self) -> None:
        """Close every eventfd (the client went away)."""
        for vector in range(self.count):
            fd, self._fds[vector] = self._fds[vector], None
            if fd is not None:
                fd.close()
