"""virtio-net on the wire (virtio 1.2, section 5.1): feature bits, the packet
header, the config space and the control queue's commands.

Every layout is little-endian (virtio 1.0 and later).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CONFIG",
    "CONFIG_SIZE",
    "CSUM_START_OFFSET",
    "ETH_ALEN",
    "ETH_HLEN",
    "HEADER",
    "HEADER_SIZE",
    "MAX_GSO_FRAME",
    "MQ_VQ_PAIRS_MAX",
    "MQ_VQ_PAIRS_MIN",
    "NUM_BUFFERS_OFFSET",
    "VLAN_HLEN",
    "CtrlAck",
    "CtrlClass",
    "CtrlMac",
    "CtrlMq",
    "CtrlRx",
    "GsoType",
    "HeaderFlag",
    "NetFeature",
    "NetStatus",
]


class NetFeature(enum.IntEnum):
    """Device feature bit numbers (virtio 1.2, 5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56
    HASH_REPORT = 57
    GUEST_HDRLEN = 59
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


class NetStatus(enum.IntFlag):
    """The config space ``status`` field."""

    LINK_UP = 1
    ANNOUNCE = 2


class HeaderFlag(enum.IntFlag):
    """``virtio_net_hdr.flags``."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(enum.IntEnum):
    """``virtio_net_hdr.gso_type`` (the ECN bit, 0x80, may be or-ed in)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


#: struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers. It precedes every frame in both directions.
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size
NUM_BUFFERS_OFFSET = 10
CSUM_START_OFFSET = 6
assert HEADER_SIZE == 12, HEADER_SIZE

#: struct virtio_net_config up to ``mtu``: mac, status, max_virtqueue_pairs, mtu
CONFIG = struct.Struct("<6sHHH")
CONFIG_SIZE = CONFIG.size
assert CONFIG_SIZE == 12, CONFIG_SIZE

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_ALEN = 6
#: the largest frame a GSO header may describe (64 KiB of IP plus the Ethernet header)
MAX_GSO_FRAME = 65535 + ETH_HLEN + VLAN_HLEN


class CtrlClass(enum.IntEnum):
    """``virtio_net_ctrl_hdr.class`` (5.1.6.5)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


class CtrlRx(enum.IntEnum):
    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class CtrlMac(enum.IntEnum):
    TABLE_SET = 0
    ADDR_SET = 1


class CtrlMq(enum.IntEnum):
    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1
    HASH_CONFIG = 2


#: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN and _MAX
MQ_VQ_PAIRS_MIN = 1
MQ_VQ_PAIRS_MAX = 0x8000


class CtrlAck(enum.IntEnum):
    OK = 0
    ERR = 1
