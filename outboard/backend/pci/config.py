"""PCI configuration space: a type-0 header, BAR registers and a capability list.

Every byte has a write mask: bits set in ``wmask`` take the written value,
bits set in ``w1c`` are cleared by writing 1 (status bits), every other bit is
read-only. BAR sizing falls out of the masks: the address bits below the BAR's
size are read-only zero, so writing all-ones reads back the size mask. Registers
whose value lives elsewhere (the MSI-X message control, the interrupt status
bit) are kept current by read hooks and applied by write hooks.

All multi-byte fields are little-endian (PCI Local Bus 3.0, 6.1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CONFIG_SPACE_SIZE",
    "EXTENDED_CONFIG_SPACE_SIZE",
    "BarKind",
    "CapabilityId",
    "Command",
    "ConfigSpace",
    "Status",
]

CONFIG_SPACE_SIZE = 256
EXTENDED_CONFIG_SPACE_SIZE = 4096

# Offsets in the type-0 header.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BASE_ADDRESS_0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
#: where the capability list may start (the header ends at 0x40)
CAPABILITIES_START = 0x40


class Command(enum.IntFlag):
    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAPABILITY_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


#: status bits a write of 1 clears
STATUS_W1C = (Status.MASTER_DATA_PARITY_ERROR | Status.SIGNALED_TARGET_ABORT
              | Status.RECEIVED_TARGET_ABORT | Status.RECEIVED_MASTER_ABORT
              | Status.SIGNALED_SYSTEM_ERROR | Status.DETECTED_PARITY_ERROR)


class CapabilityId(enum.IntEnum):
    POWER_MANAGEMENT = 0x01
    VENDOR_SPECIFIC = 0x09
    EXPRESS = 0x10
    MSIX = 0x11


class BarKind(enum.Enum):
    MEMORY32 = "32-bit memory"
    MEMORY64 = "64-bit memory"
    IO = "I/O"


@dataclass(frozen=True)
class _Hook:
    start: int
    end: int
    call: Callable[[int, int], None]

    def overlaps(self, offset: int, size: int) -> bool:
        return offset < self.end and self.start < offset + size


class ConfigSpace:
    """The bytes of a function's configuration space, with their write rules."""

    def __init__(self, size: int = EXTENDED_CONFIG_SPACE_SIZE) -> None:
        if size not in (CONFIG_SPACE_SIZE, EXTENDED_CONFIG_SPACE_SIZE):
            raise ValueError(f"config space of {size} bytes")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1c = bytearray(size)
        self._reset_data = b""
        self._read_hooks: list[_Hook] = []
        self._write_hooks: list[_Hook] = []
        self._last_capability = 0
        self._next_capability = CAPABILITIES_START

    # -- building ----------------------------------------------------------

    def set(self, offset: int, size: int, value: int, *, wmask: int = 0, w1c: int = 0) -> None:
        """Define a field: its reset value and which of its bits software may write."""
        self._check(offset, size)
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1c[offset:offset + size] = w1c.to_bytes(size, "little")

    def on_read(self, offset: int, size: int, call: Callable[[int, int], None]) -> None:
        """``call(offset, size)`` refreshes ``data`` in ``[offset, offset + size)``
        before a read that overlaps it (and gets the read's own range)."""
        self._read_hooks.append(_Hook(offset, offset + size, call))

    def on_write(self, offset: int, size: int, call: Callable[[int, int], None]) -> None:
        """``call(offset, size)`` applies the new ``data`` in ``[offset, offset + size)``
        after a write that overlaps it (and gets the write's own range)."""
        self._write_hooks.append(_Hook(offset, offset + size, call))

    def type0_header(self, *, vendor_id: int, device_id: int, revision: int,
                     class_code: int, subsystem_vendor_id: int, subsystem_id: int,
                     interrupt_pin: int = 1) -> None:
        """A type-0 (endpoint) header with no BARs yet and an empty capability list."""
        self.set(VENDOR_ID, 2, vendor_id)
        self.set(DEVICE_ID, 2, device_id)
        self.set(COMMAND, 2, 0, wmask=Command.MEMORY_SPACE | Command.BUS_MASTER
                 | Command.PARITY_ERROR_RESPONSE | Command.SERR | Command.INTX_DISABLE)
        self.set(STATUS, 2, 0, w1c=STATUS_W1C)
        self.set(REVISION_ID, 1, revision)
        self.set(CLASS_PROG, 3, class_code)
        self.set(CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self.set(HEADER_TYPE, 1, 0)
        self.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set(SUBSYSTEM_ID, 2, subsystem_id)
        self.set(INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.set(INTERRUPT_PIN, 1, interrupt_pin)

    def bar(self, index: int, size: int, kind: BarKind = BarKind.MEMORY32, *,
            prefetchable: bool = False) -> None:
        """Declare BAR ``index``: ``size`` must be a power of two (QEMU aborts on
        others), at least 16 bytes for memory and 4 for I/O (PCI 3.0, 6.2.5.1)."""
        least = 4 if kind is BarKind.IO else 16
        if size < least or size & (size - 1):
            raise ValueError(f"BAR {index}: size {size:#x} is not a power of two >= {least}")
        last = 4 if kind is BarKind.MEMORY64 else 5
        if not 0 <= index <= last:
            raise ValueError(f"BAR index {index} for a {kind.value} BAR")
        offset = BASE_ADDRESS_0 + 4 * index
        if kind is BarKind.IO:
            if size > 256:
                raise ValueError(f"BAR {index}: an I/O BAR of {size:#x} bytes")
            self.set(offset, 4, 1, wmask=~(size - 1) & 0xFFFF_FFFC)
            self.set(COMMAND, 2, self.u16(COMMAND),
                     wmask=int.from_bytes(self.wmask[COMMAND:COMMAND + 2], "little")
                     | Command.IO_SPACE)
            return
        flags = (0b100 if kind is BarKind.MEMORY64 else 0) | (0b1000 if prefetchable else 0)
        if kind is BarKind.MEMORY32:
            if size > 1 << 31:
                raise ValueError(f"BAR {index}: a 32-bit BAR of {size:#x} bytes")
            self.set(offset, 4, flags, wmask=~(size - 1) & 0xFFFF_FFF0)
            return
        mask = ~(size - 1) & 0xFFFF_FFFF_FFFF_FFF0
        self.set(offset, 4, flags, wmask=mask & 0xFFFF_FFFF)
        self.set(offset + 4, 4, 0, wmask=mask >> 32)

    def add_capability(self, cap_id: int, body: bytes, *, wmask: bytes = b"",
                       w1c: bytes = b"") -> int:
        """Append a capability (``body`` follows its ID and next pointer) to the
        list; return its offset. Capabilities are DWORD aligned (PCI 3.0, 6.7)."""
        offset = self._next_capability
        size = 2 + len(body)
        if offset + size > CONFIG_SPACE_SIZE:
            raise ValueError("the capability list does not fit the first 256 bytes")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2:offset + size] = body
        for mask, target in ((wmask, self.wmask), (w1c, self.w1c)):
            if mask:
                if len(mask) != len(body):
                    raise ValueError("a capability mask must cover the body")
                target[offset + 2:offset + size] = mask
        if self._last_capability:
            self.data[self._last_capability + 1] = offset
        else:
            self.data[CAPABILITY_LIST] = offset
            self.data[STATUS] |= Status.CAPABILITY_LIST
        self._last_capability = offset
        self._next_capability = (offset + size + 3) & ~3
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """The capability list as (id, offset), walking the next pointers."""
        out: list[tuple[int, int]] = []
        offset = self.data[CAPABILITY_LIST] & ~3 if self.data[STATUS] & Status.CAPABILITY_LIST \
            else 0
        while offset and len(out) < 48:
            out.append((self.data[offset], offset))
            offset = self.data[offset + 1] & ~3
        return out

    def seal(self) -> None:
        """Everything is defined: remember the reset values."""
        self._reset_data = bytes(self.data)

    def reset(self) -> None:
        """Back to the values at ``seal``."""
        self.data[:] = self._reset_data

    # -- access ------------------------------------------------------------

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"config access {offset:#x}+{size} outside {self.size} bytes")

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        for hook in self._read_hooks:
            if hook.overlaps(offset, size):
                hook.call(offset, size)
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        self._check(offset, size)
        for i, value in enumerate(data, offset):
            mask = self.wmask[i]
            new = (self.data[i] & ~mask) | (value & mask)
            self.data[i] = new & ~(value & self.w1c[i]) & 0xFF
        for hook in self._write_hooks:
            if hook.overlaps(offset, size):
                hook.call(offset, size)

    def u8(self, offset: int) -> int:
        return self.data[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset:offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset:offset + 4], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Store a value the device computed (no masks): read-only state."""
        self.data[offset:offset + size] = value.to_bytes(size, "little")
