"""vhost-user on the wire (QEMU docs/interop/vhost-user.rst): names, layouts, rules.

All numbers are in the machine's native byte order ("Message Specification").
Every front-end request is one row of ``REQUESTS``: its payload, how many fds
it carries, which protocol feature it needs, and whether it always replies.
The connection core and the tests both read that table.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "REQUESTS",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "BackendReq",
    "ConfigSpace",
    "FdRule",
    "Flags",
    "FrontendReq",
    "Header",
    "InflightDescription",
    "IotlbMsg",
    "LogDescription",
    "MemoryRegionDescription",
    "ProtocolFeature",
    "RequestRule",
    "SingleMemoryRegion",
    "VringAddress",
    "VringState",
]

VHOST_USER_VERSION = 0x1
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8
VHOST_VRING_F_LOG = 1 << 0
#: fds one message may carry (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_FDS = 8
MAX_MEM_REGIONS = 8
#: the largest payload we accept (GET/SET_CONFIG carries at most 256 bytes of config)
MAX_PAYLOAD = 4096
#: config space size limit of a GET_CONFIG/SET_CONFIG payload
MAX_CONFIG_SIZE = 256


class FrontendReq(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendReq(enum.IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    SHMEM = 20


class Flags(enum.IntFlag):
    VERSION_MASK = 0x3
    REPLY = 1 << 2
    NEED_REPLY = 1 << 3


class _Native(ctypes.Structure):
    """vhost-user payloads are native-endian C structures (natural alignment:
    QEMU packs the message union, not the kernel structures inside it)."""


class Header(_Native):
    _fields_ = [("request", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("size", ctypes.c_uint32)]


class VringState(_Native):
    _fields_ = [("index", ctypes.c_uint32), ("num", ctypes.c_uint32)]


class VringAddress(_Native):
    _fields_ = [("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("desc_user_addr", ctypes.c_uint64), ("used_user_addr", ctypes.c_uint64),
                ("avail_user_addr", ctypes.c_uint64), ("log_guest_addr", ctypes.c_uint64)]


class MemoryRegionDescription(_Native):
    _fields_ = [("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64), ("mmap_offset", ctypes.c_uint64)]


class MemoryTableHeader(_Native):
    _fields_ = [("nregions", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class SingleMemoryRegion(_Native):
    _fields_ = [("padding", ctypes.c_uint64), ("region", MemoryRegionDescription)]


class LogDescription(_Native):
    _fields_ = [("mmap_size", ctypes.c_uint64), ("mmap_offset", ctypes.c_uint64)]


class IotlbMsg(_Native):
    _fields_ = [("iova", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("uaddr", ctypes.c_uint64), ("perm", ctypes.c_uint8), ("type", ctypes.c_uint8)]


class ConfigHeader(_Native):
    _fields_ = [("offset", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


ConfigSpace = ConfigHeader


class InflightDescription(_Native):
    _fields_ = [("mmap_size", ctypes.c_uint64), ("mmap_offset", ctypes.c_uint64),
                ("num_queues", ctypes.c_uint16), ("queue_size", ctypes.c_uint16)]


class CryptoSession(_Native):
    # session_id (i64) + a setup-data block; only its presence is checked here.
    _fields_ = [("session_id", ctypes.c_int64)]


class DeviceStateTransfer(_Native):
    _fields_ = [("transfer_direction", ctypes.c_uint32), ("migration_phase", ctypes.c_uint32)]


for _cls, _size in ((Header, 12), (VringState, 8), (VringAddress, 40),
                    (MemoryRegionDescription, 32), (MemoryTableHeader, 8),
                    (SingleMemoryRegion, 40), (LogDescription, 16), (IotlbMsg, 32),
                    (ConfigHeader, 12), (InflightDescription, 24),
                    (DeviceStateTransfer, 8)):
    assert ctypes.sizeof(_cls) == _size, (_cls, ctypes.sizeof(_cls))

HEADER_SIZE = ctypes.sizeof(Header)
U64 = ctypes.c_uint64


class FdRule(enum.Enum):
    NONE = "none"              # no fd
    ONE = "one"                # exactly one fd
    OPTIONAL = "optional"      # one fd, or none with the NOFD bit of the u64 set
    PER_REGION = "per-region"  # one per memory region (SET_MEM_TABLE)
    IGNORED = "ignored"        # zero or one; one is closed unused (REM_MEM_REG)


class Payload(enum.Enum):
    NONE = "none"
    U64 = "u64"
    STATE = "vring state"
    ADDR = "vring address"
    MEM_TABLE = "memory regions"
    MEM_REGION = "single memory region"
    LOG = "log description"
    IOTLB = "iotlb message"
    CONFIG = "config space"
    INFLIGHT = "inflight description"
    DEVICE_STATE = "device state transfer"
    UUID = "uuid"
    ANY = "opaque"


@dataclass(frozen=True)
class RequestRule:
    payload: Payload
    fds: FdRule = FdRule.NONE
    #: the protocol feature that must be negotiated first, if any
    needs: ProtocolFeature | None = None
    #: replies always (not only when need_reply is set under REPLY_ACK)
    replies: bool = False
    #: this back-end implements it (others get a clear refusal)
    implemented: bool = True


_R = RequestRule
_P = Payload
_F = FdRule
_PF = ProtocolFeature

REQUESTS: dict[FrontendReq, RequestRule] = {
    FrontendReq.GET_FEATURES: _R(_P.NONE, replies=True),
    FrontendReq.SET_FEATURES: _R(_P.U64),
    FrontendReq.SET_OWNER: _R(_P.NONE),
    FrontendReq.RESET_OWNER: _R(_P.NONE),
    FrontendReq.SET_MEM_TABLE: _R(_P.MEM_TABLE, _F.PER_REGION),
    FrontendReq.SET_LOG_BASE: _R(_P.LOG, _F.ONE, _PF.LOG_SHMFD, replies=True, implemented=False),
    FrontendReq.SET_LOG_FD: _R(_P.NONE, _F.ONE, implemented=False),
    FrontendReq.SET_VRING_NUM: _R(_P.STATE),
    FrontendReq.SET_VRING_ADDR: _R(_P.ADDR),
    FrontendReq.SET_VRING_BASE: _R(_P.STATE),
    FrontendReq.GET_VRING_BASE: _R(_P.STATE, replies=True),
    FrontendReq.SET_VRING_KICK: _R(_P.U64, _F.OPTIONAL),
    FrontendReq.SET_VRING_CALL: _R(_P.U64, _F.OPTIONAL),
    FrontendReq.SET_VRING_ERR: _R(_P.U64, _F.OPTIONAL),
    FrontendReq.GET_PROTOCOL_FEATURES: _R(_P.NONE, replies=True),
    FrontendReq.SET_PROTOCOL_FEATURES: _R(_P.U64),
    FrontendReq.GET_QUEUE_NUM: _R(_P.NONE, needs=_PF.MQ, replies=True),
    FrontendReq.SET_VRING_ENABLE: _R(_P.STATE),
    FrontendReq.SEND_RARP: _R(_P.U64, needs=_PF.RARP, implemented=False),
    FrontendReq.NET_SET_MTU: _R(_P.U64, needs=_PF.NET_MTU, implemented=False),
    FrontendReq.SET_BACKEND_REQ_FD: _R(_P.NONE, _F.ONE, _PF.BACKEND_REQ, implemented=False),
    FrontendReq.IOTLB_MSG: _R(_P.IOTLB, replies=True, implemented=False),
    FrontendReq.SET_VRING_ENDIAN: _R(_P.STATE, needs=_PF.CROSS_ENDIAN, implemented=False),
    FrontendReq.GET_CONFIG: _R(_P.CONFIG, needs=_PF.CONFIG, replies=True),
    FrontendReq.SET_CONFIG: _R(_P.CONFIG, needs=_PF.CONFIG),
    FrontendReq.CREATE_CRYPTO_SESSION: _R(_P.ANY, needs=_PF.CRYPTO_SESSION, replies=True,
                                          implemented=False),
    FrontendReq.CLOSE_CRYPTO_SESSION: _R(_P.U64, needs=_PF.CRYPTO_SESSION, implemented=False),
    FrontendReq.POSTCOPY_ADVISE: _R(_P.NONE, needs=_PF.PAGEFAULT, replies=True,
                                    implemented=False),
    FrontendReq.POSTCOPY_LISTEN: _R(_P.NONE, needs=_PF.PAGEFAULT, implemented=False),
    FrontendReq.POSTCOPY_END: _R(_P.NONE, needs=_PF.PAGEFAULT, replies=True,
                                 implemented=False),
    FrontendReq.GET_INFLIGHT_FD: _R(_P.INFLIGHT, needs=_PF.INFLIGHT_SHMFD, replies=True,
                                    implemented=False),
    FrontendReq.SET_INFLIGHT_FD: _R(_P.INFLIGHT, _F.ONE, _PF.INFLIGHT_SHMFD, implemented=False),
    FrontendReq.GPU_SET_SOCKET: _R(_P.NONE, _F.ONE, implemented=False),
    FrontendReq.RESET_DEVICE: _R(_P.NONE, needs=_PF.RESET_DEVICE),
    FrontendReq.VRING_KICK: _R(_P.STATE, needs=_PF.INBAND_NOTIFICATIONS, implemented=False),
    FrontendReq.GET_MAX_MEM_SLOTS: _R(_P.NONE, needs=_PF.CONFIGURE_MEM_SLOTS, replies=True),
    FrontendReq.ADD_MEM_REG: _R(_P.MEM_REGION, _F.ONE, _PF.CONFIGURE_MEM_SLOTS),
    FrontendReq.REM_MEM_REG: _R(_P.MEM_REGION, _F.IGNORED, _PF.CONFIGURE_MEM_SLOTS),
    FrontendReq.SET_STATUS: _R(_P.U64, needs=_PF.STATUS),
    FrontendReq.GET_STATUS: _R(_P.NONE, needs=_PF.STATUS, replies=True),
    FrontendReq.GET_SHARED_OBJECT: _R(_P.UUID, needs=_PF.SHARED_OBJECT, replies=True,
                                      implemented=False),
    FrontendReq.SET_DEVICE_STATE_FD: _R(_P.DEVICE_STATE, _F.ONE, _PF.DEVICE_STATE,
                                        replies=True, implemented=False),
    FrontendReq.CHECK_DEVICE_STATE: _R(_P.NONE, needs=_PF.DEVICE_STATE, replies=True,
                                       implemented=False),
    FrontendReq.GET_SHMEM_CONFIG: _R(_P.NONE, needs=_PF.SHMEM, replies=True, implemented=False),
}

#: exact payload sizes; MEM_TABLE, CONFIG and ANY are checked by their own rules
PAYLOAD_SIZES: dict[Payload, int] = {
    Payload.NONE: 0,
    Payload.U64: 8,
    Payload.STATE: ctypes.sizeof(VringState),
    Payload.ADDR: ctypes.sizeof(VringAddress),
    Payload.MEM_REGION: ctypes.sizeof(SingleMemoryRegion),
    Payload.LOG: ctypes.sizeof(LogDescription),
    Payload.IOTLB: ctypes.sizeof(IotlbMsg),
    Payload.INFLIGHT: ctypes.sizeof(InflightDescription),
    Payload.DEVICE_STATE: ctypes.sizeof(DeviceStateTransfer),
    Payload.UUID: 16,
}

#: protocol features this back-end implements
SUPPORTED_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS | 1 << ProtocolFeature.STATUS
    | 1 << ProtocolFeature.RESET_DEVICE
)
