"""Virtio constants shared by every device and transport (virtio 1.2)."""

from __future__ import annotations

import enum

__all__ = ["DeviceStatus", "Feature", "VirtioDeviceId", "bit"]


def bit(n: int) -> int:
    return 1 << n


class Feature(enum.IntEnum):
    """Reserved (device-independent) feature bit numbers: virtio 1.2, section 6."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


class DeviceStatus(enum.IntFlag):
    """The device status field: virtio 1.2, section 2.1."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class VirtioDeviceId(enum.IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    NINEP = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    FS = 26
