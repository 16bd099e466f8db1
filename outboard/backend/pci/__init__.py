"""A PCI function in software: config space, BARs, MSI-X, INTx, virtio-pci."""

from .config import BarKind, CapabilityId, ConfigSpace
from .function import Bar, IoEventFd, PciFunction, Window
from .intx import Intx
from .msix import Msix
from .virtio_pci import NO_VECTOR, CfgType, VirtioPciFunction

__all__ = [
    "NO_VECTOR",
    "Bar",
    "BarKind",
    "CapabilityId",
    "CfgType",
    "ConfigSpace",
    "Intx",
    "IoEventFd",
    "Msix",
    "PciFunction",
    "VirtioPciFunction",
    "Window",
]
