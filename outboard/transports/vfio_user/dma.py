"""The client memory a vfio-user server may reach, keyed by IOVA ("Client memory access").

A DMA_MAP that comes with an fd is mapped here, zero-copy, into a
``GuestMemory`` whose regions are keyed by IOVA (the ``gpa`` of each region is
its IOVA), so virtqueues reach it like any guest RAM. A DMA_MAP without an fd
(QEMU sends some, read-only ROM for one) is only recorded: the server reaches
it with DMA_READ / DMA_WRITE commands to the client.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

from ...backend.fd import OwnedFd
from ...backend.memory import GuestMemory, MemoryRegion, RegionSpec
from .connection import CommandFailed
from .wire import EEXIST, EFAULT, EINVAL, ENOENT, DmaMapFlags

__all__ = ["DmaRegion", "DmaTable"]


@dataclass(eq=False)
class DmaRegion:
    """One DMA window: ``size`` bytes at ``iova``; ``mapped`` if it came with an fd."""

    iova: int
    size: int
    flags: int
    offset: int = 0
    mapped: MemoryRegion | None = None

    @property
    def readable(self) -> bool:
        return bool(self.flags & DmaMapFlags.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DmaMapFlags.WRITE)

    def release(self) -> None:
        if self.mapped is not None:
            self.mapped.release()


class DmaTable:
    """Every DMA window of one connection."""

    def __init__(self, max_regions: int = 65535) -> None:
        self.memory = GuestMemory()
        self.max_regions = max_regions
        self._regions: list[DmaRegion] = []

    def __iter__(self) -> Iterator[DmaRegion]:
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)

    def map(self, iova: int, size: int, flags: int, offset: int = 0,
            fd: OwnedFd | None = None) -> DmaRegion:
        """Add a window, taking ownership of ``fd`` (closed if the map fails).

        "A command to map over an existing region must be failed by the server
        with EEXIST" (VFIO_USER_DMA_MAP).
        """
        try:
            for old in self._regions:
                if iova < old.iova + old.size and old.iova < iova + size:
                    raise CommandFailed(EEXIST, f"{iova:#x}+{size:#x} overlaps "
                                                f"{old.iova:#x}+{old.size:#x}")
            if len(self._regions) >= self.max_regions:
                raise CommandFailed(EFAULT, f"more than {self.max_regions} DMA windows")
            region = DmaRegion(iova, size, flags, offset)
            if fd is not None:
                region.mapped = _map(iova, size, flags, offset, fd)
                fd = None  # the region owns it now
                self.memory.add(region.mapped)
        except BaseException:
            if fd is not None:
                fd.close()
            raise
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.iova)
        return region

    def unmap(self, iova: int, size: int) -> DmaRegion:
        """Take a window out; "The address and size of the DMA region being
        unmapped must match exactly a previous mapping" (VFIO_USER_DMA_UNMAP).

        The caller releases the region once nothing refers to it any more.
        """
        for region in self._regions:
            if region.iova == iova and region.size == size:
                self._regions.remove(region)
                if region.mapped is not None:
                    spec = region.mapped.spec
                    self.memory.remove(spec.gpa, spec.size, spec.uva)
                return region
        raise CommandFailed(ENOENT, f"no DMA window {iova:#x}+{size:#x}")

    def unmap_all(self) -> list[DmaRegion]:
        regions = list(self._regions)
        for region in regions:
            self.unmap(region.iova, region.size)
        return regions

    def find(self, iova: int, size: int) -> DmaRegion | None:
        """The window holding all of ``[iova, iova + size)``, if one does."""
        for region in self._regions:
            if region.iova <= iova and iova + size <= region.iova + region.size:
                return region
        return None

    def clear(self) -> None:
        """Release every window (the client went away)."""
        for region in self.unmap_all():
            region.release()


def _map(iova: int, size: int, flags: int, offset: int, fd: OwnedFd) -> MemoryRegion:
    """Map ``size`` bytes of ``fd`` at ``offset``; read-only unless the window is
    writable. Takes ownership of ``fd``."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & DmaMapFlags.WRITE else 0)
    try:
        mapping = mmap.mmap(fd.fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
    except (OSError, ValueError, OverflowError) as exc:
        fd.close()
        errno = (exc.errno or EFAULT) if isinstance(exc, OSError) else EINVAL
        raise CommandFailed(errno, f"cannot map {iova:#x}+{size:#x} at file offset "
                                   f"{offset:#x}: {exc}") from None
    spec = RegionSpec(gpa=iova, size=size, uva=iova, mmap_offset=0)
    return MemoryRegion(spec=spec, view=memoryview(mapping), fd=fd, _mapping=mapping)
