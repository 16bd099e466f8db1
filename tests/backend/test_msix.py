"""MSI-X in the device: the table, the PBA, masking and delivery, one rule per test."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from outboard.backend.fd import OwnedFd
from outboard.backend.pci.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK, Msix

pytestmark = pytest.mark.usefixtures("fd_leak_check")


class Vectors:
    """An Msix with an eventfd per vector; the test keeps its own end of each."""

    def __init__(self, count: int = 4) -> None:
        self.msix = Msix(count)
        self.fds = [OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                    for _ in range(count)]
        for vector, fd in enumerate(self.fds):
            self.msix.set_eventfd(vector, OwnedFd(os.dup(fd.fd)))

    def fired(self, vector: int) -> int:
        """Eventfd writes since the last call."""
        try:
            return int.from_bytes(os.read(self.fds[vector].fd, 8), "little")
        except BlockingIOError:
            return 0

    def enable(self, *, function_mask: bool = False) -> None:
        self.msix.set_control(CONTROL_ENABLE | (CONTROL_FUNCTION_MASK if function_mask else 0))

    def mask(self, vector: int, masked: bool) -> None:
        self.msix.write_table(16 * vector + 12, struct.pack("<I", int(masked)))

    def pba(self) -> int:
        return int.from_bytes(self.msix.read_pba(0, self.msix.pba_size), "little")

    def close(self) -> None:
        self.msix.close()
        for fd in self.fds:
            fd.close()


@pytest.fixture
def vectors() -> Iterator[Vectors]:
    v = Vectors()
    yield v
    v.close()


def test_reset_state_is_disabled_and_every_vector_masked() -> None:
    msix = Msix(3)
    assert not msix.enabled and not msix.function_masked
    for vector in range(3):
        assert msix.table_masked(vector)
        assert msix.read_table(16 * vector, 16) == bytes(12) + b"\1\0\0\0"
    assert msix.control == 2
    assert msix.read_pba(0, 8) == bytes(8)


@pytest.mark.parametrize("count", [0, 2049])
def test_vector_count_is_bounded(count: int) -> None:
    with pytest.raises(ValueError):
        Msix(count)


def test_assigning_an_eventfd_unmasks_the_vector(vectors: Vectors) -> None:
    """As the host kernel does when VFIO_DEVICE_SET_IRQS assigns a vector."""
    assert not vectors.msix.table_masked(0)
    vectors.msix.set_eventfd(0, None)
    assert vectors.msix.table_masked(0)


def test_unmasked_vector_fires_at_once(vectors: Vectors) -> None:
    vectors.enable()
    assert vectors.msix.trigger(1)
    assert vectors.fired(1) == 1
    assert vectors.pba() == 0
    assert vectors.msix.delivered == [0, 1, 0, 0]


def test_vector_raised_while_msix_is_disabled_is_pending(vectors: Vectors) -> None:
    assert not vectors.msix.trigger(2)
    assert vectors.fired(2) == 0
    assert vectors.pba() == 1 << 2


def test_enabling_msix_fires_pending_vectors(vectors: Vectors) -> None:
    vectors.msix.trigger(2)
    vectors.enable()
    assert vectors.fired(2) == 1
    assert vectors.pba() == 0


def test_function_mask_holds_every_vector(vectors: Vectors) -> None:
    vectors.enable(function_mask=True)
    vectors.msix.trigger(0)
    vectors.msix.trigger(3)
    assert vectors.fired(0) == vectors.fired(3) == 0
    assert vectors.pba() == 0b1001
    vectors.enable()
    assert vectors.fired(0) == vectors.fired(3) == 1
    assert vectors.pba() == 0


def test_pending_vector_fires_on_unmask(vectors: Vectors) -> None:
    vectors.enable()
    vectors.mask(1, True)
    vectors.msix.trigger(1)
    assert vectors.pba() == 0b10 and vectors.fired(1) == 0
    vectors.mask(1, False)
    assert vectors.fired(1) == 1
    assert vectors.pba() == 0


def test_vector_raised_twice_while_masked_fires_once(vectors: Vectors) -> None:
    vectors.enable()
    vectors.mask(0, True)
    vectors.msix.trigger(0)
    vectors.msix.trigger(0)
    vectors.mask(0, False)
    assert vectors.fired(0) == 1


def test_unmasking_without_a_pending_bit_fires_nothing(vectors: Vectors) -> None:
    vectors.enable()
    vectors.mask(0, True)
    vectors.mask(0, False)
    assert vectors.fired(0) == 0


def test_client_mask_holds_the_vector(vectors: Vectors) -> None:
    vectors.enable()
    vectors.msix.client_mask(2)
    vectors.msix.trigger(2)
    assert vectors.pba() == 0b100 and vectors.fired(2) == 0
    vectors.msix.client_unmask(2)
    assert vectors.fired(2) == 1 and vectors.pba() == 0


def test_a_vector_is_deliverable_only_when_no_mask_holds_it(vectors: Vectors) -> None:
    vectors.enable()
    vectors.mask(0, True)
    vectors.msix.client_mask(0)
    vectors.msix.trigger(0)
    vectors.mask(0, False)
    assert vectors.fired(0) == 0  # the client's mask still holds it
    vectors.msix.client_unmask(0)
    assert vectors.fired(0) == 1


def test_withdrawn_vector_does_not_fire_on_unmask(vectors: Vectors) -> None:
    vectors.enable()
    vectors.mask(3, True)
    vectors.msix.trigger(3)
    vectors.msix.withdraw(3)
    assert vectors.pba() == 0
    vectors.mask(3, False)
    assert vectors.fired(3) == 0


def test_vector_without_an_eventfd_stays_pending_until_it_gets_one(vectors: Vectors) -> None:
    vectors.enable()
    vectors.msix.set_eventfd(1, None)
    vectors.msix.trigger(1)
    assert vectors.pba() == 0b10
    vectors.msix.set_eventfd(1, OwnedFd(os.dup(vectors.fds[1].fd)))
    assert vectors.fired(1) == 1 and vectors.pba() == 0


def test_replaced_eventfd_is_closed_and_the_new_one_used(vectors: Vectors) -> None:
    vectors.enable()
    old = vectors.msix.eventfd(0)
    assert old is not None
    fresh = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    vectors.msix.set_eventfd(0, fresh)
    assert old.closed
    vectors.msix.trigger(0)
    assert vectors.fired(0) == 0
    assert int.from_bytes(os.read(fresh.fd, 8), "little") == 1


def test_table_entries_read_back_and_reserved_bits_read_zero(vectors: Vectors) -> None:
    entry = struct.pack("<QII", 0xFEE0_1000, 0x4041, 0xFFFF_FFFF)
    vectors.msix.write_table(16 * 2, entry)
    assert vectors.msix.read_table(16 * 2, 16) == struct.pack("<QII", 0xFEE0_1000, 0x4041, 1)
    assert vectors.msix.address(2) == 0xFEE0_1000
    assert vectors.msix.data(2) == 0x4041
    vectors.msix.write_table(16 * 2 + 4, b"\x12\x34")  # a partial write
    assert vectors.msix.address(2) == 0x3412_FEE0_1000


def test_accesses_outside_the_table_and_pba_are_harmless(vectors: Vectors) -> None:
    assert vectors.msix.read_table(16 * 4, 4) == bytes(4)
    vectors.msix.write_table(16 * 4, b"\0" * 4)
    assert vectors.msix.read_pba(8, 8) == bytes(8)


def test_pba_has_a_bit_per_vector_in_qwords() -> None:
    v = Vectors(70)
    try:
        assert v.msix.pba_size == 16
        v.msix.trigger(65)
        v.msix.trigger(3)
        assert v.msix.read_pba(0, 8) == (1 << 3).to_bytes(8, "little")
        assert v.msix.read_pba(8, 8) == (1 << 1).to_bytes(8, "little")
        assert v.msix.read_pba(8, 1) == b"\x02"
    finally:
        v.close()


def test_saturated_eventfd_does_not_raise(vectors: Vectors) -> None:
    vectors.enable()
    os.write(vectors.fds[0].fd, (0xFFFF_FFFF_FFFF_FFFE).to_bytes(8, "little"))
    vectors.msix.trigger(0)  # would block: the reader has a wake-up already
    assert vectors.msix.delivered[0] == 1


def test_reset_keeps_the_eventfds_but_masks_everything(vectors: Vectors) -> None:
    vectors.enable()
    vectors.msix.client_mask(0)
    vectors.msix.trigger(0)
    vectors.msix.reset()
    assert vectors.msix.eventfd(0) is not None
    assert vectors.pba() == 0
    assert not vectors.msix.client_masked(0)
    assert all(vectors.msix.table_masked(v) for v in range(4))


def test_close_closes_every_eventfd(vectors: Vectors) -> None:
    held = [vectors.msix.eventfd(v) for v in range(4)]
    vectors.msix.close()
    assert all(fd is not None and fd.closed for fd in held)


def test_bad_vector_numbers_are_refused(vectors: Vectors) -> None:
    for call in (vectors.msix.trigger, vectors.msix.withdraw, vectors.msix.client_mask):
        with pytest.raises(ValueError):
            call(4)
