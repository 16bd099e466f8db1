"""Guest memory: fd-backed regions, looked up by guest-physical or front-end address.

A lookup returns a memoryview that is a slice of one region's mapping, so it can
never reach outside that region. The mapping stays alive for as long as any view
of it exists (Python's mmap is unmapped only when the last view is gone), so a
replaced table can never leave a dangling view behind.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import GuestMemoryError
from .fd import OwnedFd

__all__ = ["GuestMemory", "MemoryRegion", "RegionSpec"]


@dataclass(frozen=True)
class RegionSpec:
    """Where a region sits: in the guest, in the front-end, and in its fd."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(eq=False)
class MemoryRegion:
    spec: RegionSpec
    view: memoryview
    fd: OwnedFd | None = None
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    @property
    def gpa(self) -> int:
        return self.spec.gpa

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def uva(self) -> int:
        return self.spec.uva

    @classmethod
    def map(cls, spec: RegionSpec, fd: OwnedFd) -> MemoryRegion:
        """Map ``spec.size`` bytes of ``fd`` starting at ``spec.mmap_offset``.

        Takes ownership of ``fd`` (closed again if the mapping fails).
        """
        try:
            if spec.size <= 0:
                raise GuestMemoryError(f"region at gpa {spec.gpa:#x} has size {spec.size}")
            if spec.mmap_offset < 0 or spec.gpa < 0 or spec.uva < 0:
                raise GuestMemoryError(f"region at gpa {spec.gpa:#x} has a negative address")
            end = spec.mmap_offset + spec.size
            if spec.gpa + spec.size > 1 << 64 or spec.uva + spec.size > 1 << 64:
                raise GuestMemoryError(f"region at gpa {spec.gpa:#x} wraps the address space")
            # Map from offset 0: mmap needs a page-aligned (on hugetlbfs, huge-page
            # aligned) offset, and the front-end's mmap offset need not be one.
            try:
                mapping = mmap.mmap(fd.fd, end, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as exc:
                raise GuestMemoryError(
                    f"cannot map region gpa {spec.gpa:#x} size {spec.size:#x} "
                    f"offset {spec.mmap_offset:#x}: {exc}"
                ) from None
        except BaseException:
            fd.close()
            raise
        view = memoryview(mapping)[spec.mmap_offset:end]
        return cls(spec=spec, view=view, fd=fd, _mapping=mapping)

    @classmethod
    def from_buffer(cls, spec: RegionSpec, buffer: bytearray | mmap.mmap) -> MemoryRegion:
        """A region over memory this process already has (tests, DMA bounce buffers)."""
        view = memoryview(buffer)
        if len(view) < spec.mmap_offset + spec.size:
            raise GuestMemoryError("buffer smaller than the region")
        return cls(spec=spec, view=view[spec.mmap_offset:spec.mmap_offset + spec.size])

    def release(self) -> None:
        """Drop this region's own references; the fd is closed now, the mapping
        when the last view of it is gone."""
        if self.fd is not None:
            self.fd.close()
        self.view.release()
        self._mapping = None


class GuestMemory:
    """A table of regions, searchable by gpa and by front-end virtual address."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._last: MemoryRegion | None = None
        for region in regions:
            self.add(region)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, region: MemoryRegion) -> None:
        new = region.spec
        for old in self._regions:
            if new.gpa < old.gpa + old.size and old.gpa < new.gpa + new.size:
                raise GuestMemoryError(
                    f"region gpa {new.gpa:#x}+{new.size:#x} overlaps "
                    f"gpa {old.gpa:#x}+{old.size:#x}"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.gpa)

    def remove(self, gpa: int, size: int, uva: int) -> MemoryRegion:
        for region in self._regions:
            s = region.spec
            if s.gpa == gpa and s.size == size and s.uva == uva:
                self._regions.remove(region)
                self._last = None
                return region
        raise GuestMemoryError(f"no region at gpa {gpa:#x} size {size:#x} uva {uva:#x}")

    def clear(self) -> None:
        """Release every region."""
        regions, self._regions, self._last = self._regions, [], None
        for region in regions:
            region.release()

    def last_region(self) -> MemoryRegion:
        """The region of the last successful lookup (a cache for hot loops)."""
        if self._last is None:
            if not self._regions:
                raise GuestMemoryError("no guest memory")
            self._last = self._regions[0]
        return self._last

    def region_of(self, gpa: int, size: int) -> MemoryRegion | None:
        """The region holding all of ``[gpa, gpa + size)``, or None; it becomes
        ``last_region``."""
        try:
            return self._find(gpa, size)
        except GuestMemoryError:
            return None

    def _find(self, gpa: int, size: int) -> MemoryRegion:
        last = self._last
        if last is not None:
            offset = gpa - last.spec.gpa
            if offset >= 0 and offset + size <= last.spec.size:
                return last
        for region in self._regions:
            offset = gpa - region.spec.gpa
            if offset >= 0 and offset + size <= region.spec.size:
                self._last = region
                return region
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not in guest memory")

    def view(self, gpa: int, size: int) -> memoryview:
        """The bytes at ``[gpa, gpa + size)``; they must lie in one region."""
        if size < 0:
            raise GuestMemoryError(f"negative size {size}")
        region = self._find(gpa, size)
        offset = gpa - region.spec.gpa
        return region.view[offset:offset + size]

    def views(self, gpa: int, size: int) -> list[memoryview]:
        """Like ``view``, but a range may span adjacent regions."""
        if size < 0:
            raise GuestMemoryError(f"negative size {size}")
        out: list[memoryview] = []
        while size > 0:
            region = self._find(gpa, 1)
            offset = gpa - region.spec.gpa
            take = min(size, region.spec.size - offset)
            out.append(region.view[offset:offset + take])
            gpa += take
            size -= take
        return out

    def uva_to_gpa(self, uva: int, size: int = 1) -> int:
        """Translate a front-end virtual address (vhost-user ring addresses)."""
        for region in self._regions:
            offset = uva - region.spec.uva
            if offset >= 0 and offset + size <= region.spec.size:
                return region.spec.gpa + offset
        raise GuestMemoryError(f"front-end range {uva:#x}+{size:#x} is not in guest memory")

    def uva_view(self, uva: int, size: int) -> memoryview:
        return self.view(self.uva_to_gpa(uva, size), size)

    def read(self, gpa: int, size: int) -> bytes:
        return b"".join(bytes(v) for v in self.views(gpa, size))

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        pos = 0
        for v in self.views(gpa, len(data)):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
