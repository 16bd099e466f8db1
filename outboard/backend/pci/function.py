"""A PCI function in software: config space, BARs made of windows, interrupts.

A BAR is a list of windows, each with its own read and write handler; bytes
between windows read as zero and ignore writes. A transport (vfio-user) reaches
the function only through ``config``, ``bar_read``/``bar_write``, ``msix``,
``intx``, ``ioeventfds`` and ``reset``: it never learns what the function is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..fd import OwnedFd
from .config import COMMAND, STATUS, BarKind, Command, ConfigSpace, Status
from .intx import Intx
from .msix import Msix

__all__ = ["Bar", "IoEventFd", "PciFunction", "Window"]

log = logging.getLogger("outboard.pci")

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, bytes], None]


@dataclass(frozen=True)
class Window:
    """``size`` bytes at ``offset`` in a BAR, served by ``read`` and ``write``
    (which get offsets relative to the window)."""

    name: str
    offset: int
    size: int
    read: ReadFn
    write: WriteFn


@dataclass
class Bar:
    index: int
    size: int
    kind: BarKind = BarKind.MEMORY32
    prefetchable: bool = False
    windows: list[Window] = field(default_factory=list)
    #: parts the client may mmap, as (offset, size), from ``mmap_fd`` at the same offsets
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)
    mmap_fd: OwnedFd | None = None

    def add(self, name: str, offset: int, size: int, read: ReadFn, write: WriteFn) -> Window:
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise ValueError(f"window {name} at {offset:#x}+{size:#x} outside BAR {self.index}")
        for other in self.windows:
            if offset < other.offset + other.size and other.offset < offset + size:
                raise ValueError(f"window {name} overlaps {other.name}")
        window = Window(name, offset, size, read, write)
        self.windows.append(window)
        self.windows.sort(key=lambda w: w.offset)
        return window

    def _pieces(self, offset: int, size: int) -> list[tuple[Window, int, int, int]]:
        """(window, offset in window, offset in the access, length) for each overlap."""
        out = []
        end = offset + size
        for w in self.windows:
            start = max(offset, w.offset)
            stop = min(end, w.offset + w.size)
            if start < stop:
                out.append((w, start - w.offset, start - offset, stop - start))
        return out

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        for window, at, pos, length in self._pieces(offset, size):
            out[pos:pos + length] = window.read(at, length)[:length].ljust(length, b"\0")
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        for window, at, pos, length in self._pieces(offset, len(data)):
            window.write(at, data[pos:pos + length])

    def close(self) -> None:
        if self.mmap_fd is not None:
            self.mmap_fd.close()


@dataclass(frozen=True)
class IoEventFd:
    """A write of ``size`` bytes at ``offset`` in a BAR that the client may turn
    into an eventfd write (KVM ioeventfd) instead of a message. The fd stays
    owned by the function."""

    offset: int
    size: int
    fd: OwnedFd
    datamatch: int | None = None


class PciFunction:
    """Config space, BARs and interrupts; subclasses fill the BARs with windows."""

    def __init__(self, config: ConfigSpace, bars: list[Bar], *, msix: Msix | None = None,
                 intx: Intx | None = None) -> None:
        self.config = config
        self.bars: dict[int, Bar] = {bar.index: bar for bar in bars}
        self.msix = msix
        self.intx = intx if intx is not None else Intx()
        for bar in bars:
            config.bar(bar.index, bar.size, bar.kind, prefetchable=bar.prefetchable)
        config.on_write(COMMAND, 2, self._command_written)
        config.on_read(STATUS, 2, self._refresh_status)

    def _command_written(self, _offset: int, _size: int) -> None:
        self.intx.set_disabled(bool(self.config.u16(COMMAND) & Command.INTX_DISABLE))

    def _refresh_status(self, _offset: int, _size: int) -> None:
        status = self.config.u16(STATUS) & ~int(Status.INTERRUPT)
        if self.intx.level:
            status |= Status.INTERRUPT
        self.config.put(STATUS, 2, status)

    # -- BAR access --------------------------------------------------------

    def bar_size(self, index: int) -> int:
        bar = self.bars.get(index)
        return bar.size if bar is not None else 0

    def _bar(self, index: int, offset: int, size: int) -> Bar:
        bar = self.bars.get(index)
        if bar is None:
            raise ValueError(f"no BAR {index}")
        if offset < 0 or size < 0 or offset + size > bar.size:
            raise ValueError(f"access {offset:#x}+{size} outside BAR {index} ({bar.size:#x})")
        return bar

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return self._bar(index, offset, size).read(offset, size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self._bar(index, offset, len(data)).write(offset, data)

    def ioeventfds(self, index: int) -> list[IoEventFd]:
        """The writes in BAR ``index`` the client may turn into eventfd writes."""
        return []

    # -- life cycle --------------------------------------------------------

    def reset(self) -> None:
        """A function-level reset: config space, MSI-X and INTx back to reset values."""
        self.config.reset()
        if self.msix is not None:
            self.msix.reset()
        self.intx.reset()

    def close(self) -> None:
        """Release what the function holds (eventfds the client gave, mapped BARs)."""
        if self.msix is not None:
            self.msix.close()
        self.intx.close()
        for bar in self.bars.values():
            bar.close()
