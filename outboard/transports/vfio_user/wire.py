"""vfio-user on the wire (QEMU docs/interop/vfio-user.rst): names, layouts, rules.

"In this revision, all data is in the endianness of the host system"
("Protocol Specification"), so every structure here is native-endian; the
payload layouts are those of ``<linux/vfio.h>`` where the spec borrows them.
Every command is one row of ``COMMANDS``: who sends it, its fixed payload,
whether more may follow, and how many fds it carries. The connection core and
the tests both read that table.
"""

from __future__ import annotations

import ctypes
import enum
import errno
from dataclasses import dataclass

__all__ = [
    "COMMANDS",
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_MSG_FDS",
    "HEADER_SIZE",
    "MAX_DATA_XFER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_MSG_FDS",
    "PAGE_SIZE",
    "VFIO_USER_MAJOR",
    "VFIO_USER_MINOR",
    "CapHeader",
    "Command",
    "CommandRule",
    "DeviceFlags",
    "DeviceInfo",
    "Direction",
    "DmaAccess",
    "DmaMap",
    "DmaMapFlags",
    "DmaUnmap",
    "DmaUnmapFlags",
    "FdRule",
    "Header",
    "HeaderFlags",
    "IoFdType",
    "IrqIndex",
    "IrqInfo",
    "IrqInfoFlags",
    "IrqSet",
    "IrqSetFlags",
    "MessageType",
    "RegionAccess",
    "RegionCap",
    "RegionIndex",
    "RegionInfo",
    "RegionInfoFlags",
    "RegionIoFds",
    "SingleWrite",
    "SparseMmapArea",
    "SparseMmapHeader",
    "SubRegionIoFd",
    "VersionHeader",
]

VFIO_USER_MAJOR = 0
VFIO_USER_MINOR = 0
PAGE_SIZE = 4096

#: "max_data_xfer_size ... Optional, with a default value of 1048576 bytes."
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
#: "max_msg_fds ... If not specified then the receiver must assume a value of 1."
DEFAULT_MAX_MSG_FDS = 1
#: what this server accepts and advertises
MAX_DATA_XFER_SIZE = 1 << 20
MAX_MSG_FDS = 16
#: the JSON of a VERSION message, NUL included
MAX_VERSION_DATA = 4096


class Command(enum.IntEnum):
    """The "Commands" table (the spec's names without ``VFIO_USER_``)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MessageType(enum.IntEnum):
    COMMAND = 0
    REPLY = 1


class HeaderFlags(enum.IntFlag):
    TYPE_MASK = 0xF
    NO_REPLY = 1 << 4
    ERROR = 1 << 5


class DmaMapFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    """``VFIO_DMA_UNMAP_FLAG_*``; QEMU sends ALL when it drops every mapping."""

    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1
    VADDR = 1 << 2


class DeviceFlags(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionInfoFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCap(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2


class RegionIndex(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


#: VFIO_PCI_NUM_REGIONS
NUM_PCI_REGIONS = 9


class IrqIndex(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
IRQ_SET_ACTION_MASK = (IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK
                       | IrqSetFlags.ACTION_TRIGGER)


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


class _Native(ctypes.Structure):
    """Host byte order, natural alignment: the C structures of the spec."""


class Header(_Native):
    _fields_ = [("msg_id", ctypes.c_uint16), ("command", ctypes.c_uint16),
                ("msg_size", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("error", ctypes.c_uint32)]


class VersionHeader(_Native):
    _fields_ = [("major", ctypes.c_uint16), ("minor", ctypes.c_uint16)]


class DmaMap(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("address", ctypes.c_uint64),
                ("size", ctypes.c_uint64)]


class DmaUnmap(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("address", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class DeviceInfo(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("num_regions", ctypes.c_uint32), ("num_irqs", ctypes.c_uint32)]


class RegionInfo(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("cap_offset", ctypes.c_uint32),
                ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class CapHeader(_Native):
    """``struct vfio_info_cap_header``; ``next`` is relative to the region info."""

    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16),
                ("next", ctypes.c_uint32)]


class SparseMmapHeader(_Native):
    _fields_ = [("nr_areas", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class SparseMmapArea(_Native):
    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class RegionIoFds(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("count", ctypes.c_uint32)]


class SubRegionIoFd(_Native):
    """One ioeventfd sub-region of a GET_REGION_IO_FDS reply."""

    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("fd_index", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("datamatch", ctypes.c_uint64)]


class IrqInfo(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("count", ctypes.c_uint32)]


class IrqSet(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("start", ctypes.c_uint32),
                ("count", ctypes.c_uint32)]


class RegionAccess(_Native):
    """REGION_READ / REGION_WRITE: the data (if any) follows."""

    _fields_ = [("offset", ctypes.c_uint64), ("region", ctypes.c_uint32),
                ("count", ctypes.c_uint32)]


class DmaAccess(_Native):
    """DMA_READ / DMA_WRITE: the data (if any) follows."""

    _fields_ = [("address", ctypes.c_uint64), ("count", ctypes.c_uint64)]


class WriteMultiHeader(_Native):
    _fields_ = [("wr_cnt", ctypes.c_uint64)]


class SingleWrite(_Native):
    """One write of REGION_WRITE_MULTI: at most 8 bytes of data."""

    _fields_ = [("offset", ctypes.c_uint64), ("region", ctypes.c_uint32),
                ("count", ctypes.c_uint32), ("data", ctypes.c_uint8 * 8)]


class DeviceFeature(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class MigDataAccess(_Native):
    _fields_ = [("argsz", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _Empty(_Native):
    """A command without payload (DEVICE_RESET)."""


for _cls, _size in ((Header, 16), (VersionHeader, 4), (DmaMap, 32), (DmaUnmap, 24),
                    (DeviceInfo, 16), (RegionInfo, 32), (CapHeader, 8),
                    (SparseMmapHeader, 8), (SparseMmapArea, 16), (RegionIoFds, 16),
                    (SubRegionIoFd, 40), (IrqInfo, 16), (IrqSet, 20), (RegionAccess, 16),
                    (DmaAccess, 16), (WriteMultiHeader, 8), (SingleWrite, 24),
                    (DeviceFeature, 8), (MigDataAccess, 8), (_Empty, 0)):
    assert ctypes.sizeof(_cls) == _size, (_cls, ctypes.sizeof(_cls))

HEADER_SIZE = ctypes.sizeof(Header)
#: the largest message either side may send: a data transfer of the largest size
MAX_MESSAGE_SIZE = HEADER_SIZE + ctypes.sizeof(RegionAccess) + MAX_DATA_XFER_SIZE


class Direction(enum.Enum):
    CLIENT_TO_SERVER = "client -> server"
    SERVER_TO_CLIENT = "server -> client"


class FdRule(enum.Enum):
    NONE = "none"            # never an fd
    OPTIONAL = "optional"    # zero or one (DMA_MAP: a mappable region has one)
    PER_COUNT = "per-count"  # SET_IRQS with DATA_EVENTFD: ``count`` fds, or none


@dataclass(frozen=True)
class CommandRule:
    direction: Direction
    #: the fixed part of the command's payload
    payload: type[ctypes.Structure]
    #: whether more bytes may follow the fixed part (checked by their own rule)
    variable: bool = False
    fds: FdRule = FdRule.NONE
    #: this server implements it (others get an error reply)
    implemented: bool = True


_C = Direction.CLIENT_TO_SERVER
_S = Direction.SERVER_TO_CLIENT
_R = CommandRule

COMMANDS: dict[Command, CommandRule] = {
    Command.VERSION: _R(_C, VersionHeader, variable=True),
    Command.DMA_MAP: _R(_C, DmaMap, fds=FdRule.OPTIONAL),
    Command.DMA_UNMAP: _R(_C, DmaUnmap),
    Command.DEVICE_GET_INFO: _R(_C, DeviceInfo),
    Command.DEVICE_GET_REGION_INFO: _R(_C, RegionInfo),
    Command.DEVICE_GET_REGION_IO_FDS: _R(_C, RegionIoFds),
    Command.DEVICE_GET_IRQ_INFO: _R(_C, IrqInfo),
    Command.DEVICE_SET_IRQS: _R(_C, IrqSet, variable=True, fds=FdRule.PER_COUNT),
    Command.REGION_READ: _R(_C, RegionAccess),
    Command.REGION_WRITE: _R(_C, RegionAccess, variable=True),
    Command.DMA_READ: _R(_S, DmaAccess),
    Command.DMA_WRITE: _R(_S, DmaAccess, variable=True),
    Command.DEVICE_RESET: _R(_C, _Empty),
    Command.REGION_WRITE_MULTI: _R(_C, WriteMultiHeader, variable=True),
    Command.DEVICE_FEATURE: _R(_C, DeviceFeature, variable=True, implemented=False),
    Command.MIG_DATA_READ: _R(_C, MigDataAccess, implemented=False),
    Command.MIG_DATA_WRITE: _R(_C, MigDataAccess, variable=True, implemented=False),
}

#: the errno of each kind of refusal (the spec names EEXIST for a map over a
#: map; the rest follow the ``ioctl()`` calls the commands are derived from)
EINVAL = errno.EINVAL
ENOSYS = errno.ENOSYS
ENOTSUP = errno.EOPNOTSUPP
EEXIST = errno.EEXIST
ENOENT = errno.ENOENT
E2BIG = errno.E2BIG
EFAULT = errno.EFAULT
EIO = errno.EIO
