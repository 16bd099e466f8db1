"""Guest memory: regions, lookups by gpa and uva, and who owns the fds and mappings."""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outboard.backend.errors import GuestMemoryError
from outboard.backend.fd import OwnedFd
from outboard.backend.memory import GuestMemory, MemoryRegion, RegionSpec

pytestmark = pytest.mark.usefixtures("fd_leak_check")

PAGE = mmap.PAGESIZE
UVA = 0x7F00_0000_0000


def buffer_region(gpa: int, size: int, uva: int | None = None, fill: int = 0) -> MemoryRegion:
    """A region over a bytearray (no fd), every byte ``fill``."""
    spec = RegionSpec(gpa=gpa, size=size, uva=UVA + gpa if uva is None else uva, mmap_offset=0)
    return MemoryRegion.from_buffer(spec, bytearray([fill]) * size)


def memfd(size: int, name: str = "outboard-test") -> OwnedFd:
    fd = OwnedFd(os.memfd_create(name, os.MFD_CLOEXEC))
    os.ftruncate(fd.fd, size)
    return fd


def fds_named(name: str) -> list[int]:
    """Open fds of this process that point at the memfd called ``name``."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith(f"/memfd:{name} "):
                found.append(int(entry))
        except FileNotFoundError:
            pass
    return found


MakeMemfd = Callable[..., OwnedFd]


@pytest.fixture
def make_memfd() -> Iterator[MakeMemfd]:
    """Memfds the test keeps for itself (to write through), closed after it."""
    made: list[OwnedFd] = []

    def make(size: int, name: str = "outboard-test") -> OwnedFd:
        made.append(memfd(size, name))
        return made[-1]

    yield make
    for fd in made:
        fd.close()


def mapped(fd: OwnedFd, gpa: int, size: int, offset: int = 0) -> MemoryRegion:
    """Map a dup of ``fd`` (the region owns the dup)."""
    spec = RegionSpec(gpa=gpa, size=size, uva=UVA + gpa, mmap_offset=offset)
    return MemoryRegion.map(spec, OwnedFd(os.dup(fd.fd)))


# -- views -----------------------------------------------------------------------


@pytest.fixture
def two_regions() -> GuestMemory:
    """[0x1000, 0x2000) full of 0x11 and, adjacent, [0x2000, 0x4000) full of 0x22;
    a gap, then [0x8000, 0x9000) full of 0x33."""
    return GuestMemory([buffer_region(0x2000, 0x2000, fill=0x22),
                        buffer_region(0x1000, 0x1000, fill=0x11),
                        buffer_region(0x8000, 0x1000, fill=0x33)])


def test_regions_are_kept_in_gpa_order(two_regions: GuestMemory) -> None:
    assert [r.gpa for r in two_regions] == [0x1000, 0x2000, 0x8000]
    assert len(two_regions) == 3


@pytest.mark.parametrize(("gpa", "size"), [
    (0x1000, 0x1000), (0x1000, 1), (0x1FFF, 1), (0x2000, 0x2000), (0x3000, 0x10), (0x1800, 0),
])
def test_view_inside_a_region(two_regions: GuestMemory, gpa: int, size: int) -> None:
    view = two_regions.view(gpa, size)
    assert len(view) == size
    fill = 0x11 if gpa < 0x2000 else 0x22
    assert bytes(view) == bytes([fill]) * size


def test_view_writes_reach_guest_memory(two_regions: GuestMemory) -> None:
    two_regions.view(0x2010, 3)[:] = b"abc"
    assert two_regions.read(0x200F, 5) == b"\x22abc\x22"


@pytest.mark.parametrize(("gpa", "size"), [
    pytest.param(0x3FFF, 2, id="straddling-the-end"),
    pytest.param(0x1FFF, 2, id="straddling-two-regions"),
    pytest.param(0x4000, 1, id="just-past-the-end"),
    pytest.param(0x5000, 0x10, id="in-a-gap"),
    pytest.param(0x0FFF, 1, id="just-below-the-first"),
    pytest.param(0x8000, 0x1001, id="one-byte-too-many"),
    pytest.param(0x10_0000, 1, id="far-past-everything"),
    pytest.param(-1, 2, id="negative-gpa"),
    pytest.param(1 << 64, 1, id="past-the-address-space"),
])
def test_view_outside_one_region_is_refused(two_regions: GuestMemory, gpa: int,
                                            size: int) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.view(gpa, size)


def test_view_of_negative_size_is_refused(two_regions: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.view(0x1800, -1)


def test_view_is_no_larger_than_asked(two_regions: GuestMemory) -> None:
    view = two_regions.view(0x1000, 4)
    with pytest.raises(IndexError):
        view[4]


def test_views_across_adjacent_regions(two_regions: GuestMemory) -> None:
    views = two_regions.views(0x1FFE, 4)
    assert [bytes(v) for v in views] == [b"\x11\x11", b"\x22\x22"]
    two_regions.write(0x1FFF, b"xy")
    assert two_regions.read(0x1FFE, 4) == b"\x11xy\x22"


def test_views_across_a_gap_are_refused(two_regions: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.views(0x3FFF, 2)
    with pytest.raises(GuestMemoryError):
        two_regions.read(0x3000, 0x5001)


def test_uva_translation(two_regions: GuestMemory) -> None:
    assert two_regions.uva_to_gpa(UVA + 0x1000) == 0x1000
    assert two_regions.uva_to_gpa(UVA + 0x3FF0, 0x10) == 0x3FF0
    assert two_regions.uva_to_gpa(UVA + 0x8800, 0x800) == 0x8800
    two_regions.uva_view(UVA + 0x2001, 2)[:] = b"uv"
    assert two_regions.read(0x2000, 4) == b"\x22uv\x22"


@pytest.mark.parametrize(("uva", "size"), [
    pytest.param(UVA + 0x3FF8, 0x10, id="straddling-the-end"),
    pytest.param(UVA + 0x4000, 1, id="past-the-end"),
    pytest.param(UVA, 1, id="below"),
    pytest.param(0x1000, 1, id="a-gpa-not-a-uva"),
])
def test_uva_outside_memory_is_refused(two_regions: GuestMemory, uva: int, size: int) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.uva_to_gpa(uva, size)


def test_uva_and_gpa_need_not_run_parallel() -> None:
    memory = GuestMemory([buffer_region(0x1000, 0x1000, uva=UVA + 0x9000),
                          buffer_region(0x9000, 0x1000, uva=UVA + 0x1000)])
    assert memory.uva_to_gpa(UVA + 0x1010) == 0x9010
    assert memory.uva_to_gpa(UVA + 0x9010) == 0x1010


def test_last_region_follows_lookups(two_regions: GuestMemory) -> None:
    assert two_regions.last_region().gpa == 0x1000  # before any lookup: the first
    two_regions.view(0x8010, 4)
    assert two_regions.last_region().gpa == 0x8000
    two_regions.remove(0x8000, 0x1000, UVA + 0x8000)
    assert two_regions.last_region().gpa != 0x8000


def test_last_region_of_no_memory_is_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory().last_region()


# -- the table -------------------------------------------------------------------


@pytest.mark.parametrize(("gpa", "size"), [
    pytest.param(0x2000, 0x2000, id="same"),
    pytest.param(0x2800, 0x100, id="inside"),
    pytest.param(0x1000, 0x2000, id="straddling-the-start"),
    pytest.param(0x3800, 0x1000, id="straddling-the-end"),
    pytest.param(0x1000, 0x4000, id="containing"),
    pytest.param(0x3FFF, 1, id="last-byte"),
])
def test_overlapping_add_is_refused(gpa: int, size: int) -> None:
    memory = GuestMemory([buffer_region(0x2000, 0x2000)])
    with pytest.raises(GuestMemoryError):
        memory.add(buffer_region(gpa, size))
    assert [(r.gpa, r.size) for r in memory] == [(0x2000, 0x2000)]


def test_adjacent_add_is_accepted() -> None:
    memory = GuestMemory([buffer_region(0x2000, 0x2000)])
    memory.add(buffer_region(0x1000, 0x1000))
    memory.add(buffer_region(0x4000, 0x1000))
    assert [r.gpa for r in memory] == [0x1000, 0x2000, 0x4000]


def test_overlapping_regions_in_the_constructor_are_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([buffer_region(0, 0x2000), buffer_region(0x1000, 0x2000)])


def test_remove_by_gpa_size_and_uva(two_regions: GuestMemory) -> None:
    two_regions.view(0x2000, 1)  # the lookup now remembers this region
    region = two_regions.remove(0x2000, 0x2000, UVA + 0x2000)
    assert region.gpa == 0x2000
    assert [r.gpa for r in two_regions] == [0x1000, 0x8000]
    with pytest.raises(GuestMemoryError):
        two_regions.view(0x2000, 1)


@pytest.mark.parametrize(("gpa", "size", "uva"), [
    pytest.param(0x2000, 0x2000, UVA, id="other-uva"),
    pytest.param(0x2000, 0x1000, UVA + 0x2000, id="other-size"),
    pytest.param(0x3000, 0x1000, UVA + 0x3000, id="part-of-a-region"),
    pytest.param(0x5000, 0x1000, UVA + 0x5000, id="nothing-there"),
])
def test_remove_needs_an_exact_match(two_regions: GuestMemory, gpa: int, size: int,
                                     uva: int) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.remove(gpa, size, uva)
    assert len(two_regions) == 3


# -- fds and mappings -----------------------------------------------------------------


def test_map_shares_memory_with_the_fd(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(4 * PAGE)
    region = mapped(fd, 0x10_0000, 2 * PAGE, offset=PAGE)
    os.pwrite(fd.fd, b"seen", PAGE + 8)
    assert bytes(region.view[8:12]) == b"seen"
    region.view[0:2] = b"ok"
    assert os.pread(fd.fd, 2, PAGE) == b"ok"
    region.release()


def test_map_takes_an_offset_that_is_not_page_aligned(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(2 * PAGE)
    os.pwrite(fd.fd, b"odd", 100)
    region = mapped(fd, 0, PAGE, offset=100)
    assert bytes(region.view[:3]) == b"odd"
    region.release()


@pytest.mark.parametrize(("size", "offset"), [
    pytest.param(2 * PAGE, 0, id="larger-than-the-fd"),
    pytest.param(PAGE, PAGE, id="offset-at-the-end"),
    pytest.param(PAGE, 1, id="offset-pushes-it-past-the-end"),
    pytest.param(0, 0, id="empty"),
    pytest.param(-PAGE, 0, id="negative-size"),
    pytest.param(PAGE, -1, id="negative-offset"),
    pytest.param(1 << 64, 0, id="beyond-the-address-space"),
])
def test_map_that_cannot_be_done_fails_cleanly_and_closes_the_fd(size: int,
                                                                 offset: int) -> None:
    fd = memfd(PAGE)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map(RegionSpec(gpa=0, size=size, uva=UVA, mmap_offset=offset), fd)
    assert fd.closed


def test_map_of_an_fd_that_is_not_memory_fails_cleanly_and_closes_it() -> None:
    fd = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map(RegionSpec(gpa=0, size=PAGE, uva=UVA, mmap_offset=0), fd)
    assert fd.closed


def test_map_of_a_region_wrapping_the_address_space_closes_the_fd() -> None:
    fd = memfd(PAGE)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map(RegionSpec(gpa=(1 << 64) - 16, size=PAGE, uva=UVA, mmap_offset=0), fd)
    assert fd.closed


def test_clear_releases_the_fds_and_the_mappings() -> None:
    name = "outboard-test-clear"
    regions = [MemoryRegion.map(RegionSpec(gpa=i * PAGE, size=PAGE, uva=UVA + i * PAGE,
                                           mmap_offset=0), memfd(PAGE, name))
               for i in range(2)]
    memory = GuestMemory(regions)
    memory.view(0, 8)  # a view made and dropped leaves nothing behind
    assert fds_named(name)
    memory.clear()
    assert len(memory) == 0
    assert all(region.fd is not None and region.fd.closed for region in regions)
    assert fds_named(name) == []  # neither the fds nor the mappings' own
    with pytest.raises(GuestMemoryError):
        memory.view(0, 1)


def test_view_kept_after_clear_still_reads_valid_memory(make_memfd: MakeMemfd) -> None:
    name = "outboard-test-kept"
    fd = make_memfd(PAGE, name)
    os.pwrite(fd.fd, b"guest data", 0)
    memory = GuestMemory([mapped(fd, 0, PAGE)])
    kept = memory.view(0, 10)
    memory.clear()
    assert bytes(kept) == b"guest data"
    kept[:5] = b"GUEST"  # still mapped: the write lands in the memfd
    assert os.pread(fd.fd, 5, 0) == b"GUEST"
    kept.release()
    assert fds_named(name) == [fd.fd]  # once the view is gone, so is the mapping


def test_buffer_smaller_than_its_region_is_refused() -> None:
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_buffer(RegionSpec(gpa=0, size=PAGE, uva=UVA, mmap_offset=8),
                                 bytearray(PAGE))


def test_release_closes_the_fd_once(make_memfd: MakeMemfd) -> None:
    region = mapped(make_memfd(PAGE), 0, PAGE)
    region.release()
    assert region.fd is not None and region.fd.closed
    region.fd.close()  # harmless: it reads -1 now


# -- the property -------------------------------------------------------------------


def pattern(gpa: int, size: int, number: int) -> bytes:
    """What region ``number`` holds at ``[gpa, gpa + size)``: different in every region
    and at every address, so a view at the wrong place cannot read right."""
    return bytes((address + 31 * number) & 0xFF for address in range(gpa, gpa + size))


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Non-overlapping (gpa, size) regions, some adjacent, some with gaps."""
    regions = []
    gpa = draw(st.integers(0, 64))
    for _ in range(draw(st.integers(0, 5))):
        size = draw(st.integers(1, 64))
        regions.append((gpa, size))
        gpa += size + draw(st.sampled_from([0, 0, 1, 7, 32]))
    return regions


@settings(deadline=None, derandomize=True, max_examples=300,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), order=st.randoms(use_true_random=False),
       lookups=st.lists(st.tuples(st.integers(-8, 600), st.integers(0, 128)), max_size=8))
def test_view_lies_inside_exactly_one_region_or_is_refused(
        layout: list[tuple[int, int]], order: random.Random,
        lookups: list[tuple[int, int]]) -> None:
    regions = [MemoryRegion.from_buffer(RegionSpec(gpa=start, size=length, uva=UVA + start,
                                                   mmap_offset=0),
                                        bytearray(pattern(start, length, number)))
               for number, (start, length) in enumerate(layout)]
    order.shuffle(regions)
    memory = GuestMemory(regions)
    for gpa, size in lookups:  # one after another: a remembered region must not mislead
        holders = [number for number, (start, length) in enumerate(layout)
                   if start <= gpa and gpa + size <= start + length]
        assert len(holders) <= 1 or size == 0  # an empty range may sit where two meet
        if not holders:
            with pytest.raises(GuestMemoryError):
                memory.view(gpa, size)
            continue
        view = memory.view(gpa, size)
        assert len(view) == size
        assert bytes(view) in {pattern(gpa, size, number) for number in holders}
