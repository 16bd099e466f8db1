"""What a device is built from: guest memory, virtqueues, the device API, the runtime."""

from .device import FRAMEWORK_FEATURES, DeviceState, QueueSpec, VirtioDevice
from .errors import (
    ChainError,
    DeviceError,
    GuestMemoryError,
    LocalProtocolError,
    OutboardError,
    RemoteProtocolError,
)
from .fd import OwnedFd
from .memory import GuestMemory, MemoryRegion, RegionSpec
from .virtio import DeviceStatus, Feature, VirtioDeviceId, bit
from .virtqueue import Chain, SplitQueue

__all__ = [
    "FRAMEWORK_FEATURES",
    "Chain",
    "ChainError",
    "DeviceError",
    "DeviceState",
    "DeviceStatus",
    "Feature",
    "GuestMemory",
    "GuestMemoryError",
    "LocalProtocolError",
    "MemoryRegion",
    "OutboardError",
    "OwnedFd",
    "QueueSpec",
    "RegionSpec",
    "RemoteProtocolError",
    "SplitQueue",
    "VirtioDevice",
    "VirtioDeviceId",
    "bit",
]
