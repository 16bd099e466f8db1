"""What device authors test with: guest RAM, a split-ring driver, a vhost-user front-end."""

from .driver import Buffer, DriverQueue, Used
from .ram import GuestRam
from .vhost_user import FrontendError, VhostUserDriver, VhostUserFrontend, open_device

__all__ = [
    "Buffer",
    "DriverQueue",
    "FrontendError",
    "GuestRam",
    "Used",
    "VhostUserDriver",
    "VhostUserFrontend",
    "open_device",
]
