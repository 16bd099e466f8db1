"""The standard capabilities a function presents: MSI-X, power management, PCI Express.

Each ``add_*`` appends one capability to a ``ConfigSpace`` with its reset value
and write masks, and returns its offset. Vendor-specific capabilities (the
virtio ones) are built by their transport.
"""

from __future__ import annotations

import struct

from .config import CapabilityId, ConfigSpace
from .msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK, Msix

__all__ = ["EXPRESS_CAP_SIZE", "add_express", "add_msix", "add_power_management"]

#: a version 2 PCI Express capability structure, ID and next pointer included
EXPRESS_CAP_SIZE = 0x3C


def _mask(size: int, fields: dict[int, tuple[int, int]]) -> bytes:
    """A mask of ``size`` bytes with ``{offset: (value, width)}`` filled in."""
    out = bytearray(size)
    for offset, (value, width) in fields.items():
        out[offset:offset + width] = value.to_bytes(width, "little")
    return bytes(out)


def add_msix(config: ConfigSpace, msix: Msix, *, table_bar: int, table_offset: int,
             pba_bar: int, pba_offset: int) -> int:
    """The MSI-X capability (PCI 3.0, 6.8.2): message control, table and PBA
    locations. The enable and function mask bits live in ``msix``."""
    if table_offset % 8 or pba_offset % 8:
        raise ValueError("the MSI-X table and PBA must be QWORD aligned")
    body = struct.pack("<HII", msix.control, table_offset | table_bar, pba_offset | pba_bar)
    wmask = _mask(len(body), {0: (CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 2)})
    offset = config.add_capability(CapabilityId.MSIX, body, wmask=wmask)
    control = offset + 2

    def refresh(_offset: int, _size: int) -> None:
        config.put(control, 2, msix.control)

    def apply(_offset: int, _size: int) -> None:
        msix.set_control(config.u16(control))

    config.on_read(control, 2, refresh)
    config.on_write(control, 2, apply)
    return offset


def add_power_management(config: ConfigSpace) -> int:
    """Power management, version 3, no PME (PCI Bus Power Management 1.2, 3.2).

    PMCSR's power state is writable; No_Soft_Reset is set, so a D3hot to D0
    transition keeps the function's state.
    """
    pmc = 3  # version
    pmcsr = 1 << 3  # No_Soft_Reset
    body = struct.pack("<HHBB", pmc, pmcsr, 0, 0)
    wmask = _mask(len(body), {2: (0x3, 2)})
    return config.add_capability(CapabilityId.POWER_MANAGEMENT, body, wmask=wmask)


def add_express(config: ConfigSpace) -> int:
    """A PCI Express endpoint capability, version 2, one lane at 2.5 GT/s."""
    size = EXPRESS_CAP_SIZE - 2
    # Offsets below are from the capability's start, minus the 2 bytes of ID/next.
    fields = {
        0x02 - 2: (2, 2),                    # capabilities: version 2, endpoint
        0x04 - 2: (1 << 15, 4),              # device caps: role-based error reporting
        0x08 - 2: (0x2810, 2),               # device control: RO, no snoop, MRRS 512
        0x0C - 2: (1 | 1 << 4, 4),           # link caps: 2.5 GT/s, x1
        0x12 - 2: (1 | 1 << 4, 2),           # link status: 2.5 GT/s, x1
        0x2C - 2: (1 << 1, 4),               # link caps 2: 2.5 GT/s supported
        0x30 - 2: (1, 2),                    # link control 2: target 2.5 GT/s
    }
    body = _mask(size, fields)
    wmask = _mask(size, {
        0x08 - 2: (0x70FF | 1 << 11, 2),     # device control
        0x10 - 2: (0x00C3, 2),               # link control
        0x28 - 2: (0x0000, 2),               # device control 2
        0x30 - 2: (0x000F, 2),               # link control 2
    })
    w1c = _mask(size, {0x0A - 2: (0x000F, 2)})  # device status error bits
    return config.add_capability(CapabilityId.EXPRESS, body, wmask=wmask, w1c=w1c)
