"""Guest RAM for tests and front-ends: one memfd, a bump allocator."""

from __future__ import annotations

import mmap
import os
from typing import Literal

from ..backend.fd import OwnedFd
from ..backend.memory import GuestMemory, MemoryRegion, RegionSpec

__all__ = ["GuestRam"]


class GuestRam:
    """``size`` bytes of shareable memory at guest-physical ``gpa``.

    ``uva`` is the address the front-end claims the region has in its own
    address space (vhost-user ring addresses are given in it); any value works
    as long as the two sides agree.
    """

    def __init__(self, size: int = 16 << 20, *, gpa: int = 0, uva: int = 0x7F00_0000_0000) -> None:
        self.size = size
        self.gpa = gpa
        self.uva = uva
        self.fd = OwnedFd(os.memfd_create("outboard-guest-ram", os.MFD_CLOEXEC))
        os.ftruncate(self.fd.fd, size)
        self._map = mmap.mmap(self.fd.fd, size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = memoryview(self._map)
        self._next = 0
        # Views handed out, released on close: mmap keeps its own dup of the fd
        # until the last view of the mapping is gone.
        self._views: list[memoryview] = []

    @property
    def spec(self) -> RegionSpec:
        return RegionSpec(gpa=self.gpa, size=self.size, uva=self.uva, mmap_offset=0)

    def memory(self) -> GuestMemory:
        """The same RAM as a back-end would see it (no fd needed)."""
        return GuestMemory([MemoryRegion.from_buffer(self.spec, self._map)])

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes; return their guest-physical address."""
        start = (self._next + align - 1) & ~(align - 1)
        if start + size > self.size:
            raise MemoryError(f"guest RAM exhausted ({size} bytes wanted)")
        self._next = start + size
        return self.gpa + start

    def reset_allocator(self) -> None:
        self._next = 0

    def view(self, gpa: int, size: int, fmt: Literal["B", "H"] = "B") -> memoryview:
        """``size`` bytes at ``gpa`` (cast to ``fmt``), released when the RAM is closed."""
        offset = gpa - self.gpa
        if offset < 0 or offset + size > self.size:
            raise ValueError(f"{gpa:#x}+{size:#x} is outside guest RAM")
        view = self.buffer[offset:offset + size]
        self._views.append(view)
        if fmt != "B":
            view = view.cast(fmt)
            self._views.append(view)
        return view

    def read(self, gpa: int, size: int) -> bytes:
        offset = gpa - self.gpa
        if offset < 0 or offset + size > self.size:
            raise ValueError(f"{gpa:#x}+{size:#x} is outside guest RAM")
        return self._map[offset:offset + size]

    def write(self, gpa: int, data: bytes) -> None:
        offset = gpa - self.gpa
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"{gpa:#x}+{len(data):#x} is outside guest RAM")
        self._map[offset:offset + len(data)] = data

    def gpa_to_uva(self, gpa: int) -> int:
        return gpa - self.gpa + self.uva

    def close(self) -> None:
        self.fd.close()
        for view in reversed(self._views):
            view.release()
        self._views.clear()
        try:
            self.buffer.release()
            self._map.close()
        except BufferError:
            pass  # a view made from one of ours is still out; the mapping goes with it
