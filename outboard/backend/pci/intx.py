"""INTx: the level-triggered legacy interrupt line, delivered through an eventfd.

The line is a level: the device raises it while it has a reason (virtio: a
non-zero ISR) and lowers it when the reason is gone (virtio: the driver read
the ISR, which clears it). Over VFIO the line is *automasked*: each time it
fires, the eventfd is written once and the line masks itself until the client
unmasks it (SET_IRQS ACTION_UNMASK, or a write to the unmask eventfd it gave);
an unmask while the level is still high fires again ("VFIO_IRQ_INFO_AUTOMASKED"
in GET_IRQ_INFO). The command register's Interrupt Disable bit keeps the line
from being asserted at all (PCI 3.0, 6.2.2).
"""

from __future__ import annotations

import os

from ..fd import OwnedFd

__all__ = ["Intx"]

_ONE = (1).to_bytes(8, "little")


class Intx:
    def __init__(self) -> None:
        #: the device's level (for PCI, the Interrupt Status bit)
        self.level = False
        #: Interrupt Disable in the command register
        self.disabled = False
        #: masked by the client, or automasked after firing
        self.masked = False
        self.trigger_fd: OwnedFd | None = None
        #: written by the client (a resample eventfd) to unmask; the server watches it
        self.unmask_fd: OwnedFd | None = None
        #: eventfd writes, for tests and statistics
        self.delivered = 0

    @property
    def asserted(self) -> bool:
        """Is the line driven now (level high and not disabled)?"""
        return self.level and not self.disabled

    def set_level(self, high: bool) -> None:
        rising = high and not self.level
        self.level = high
        if rising:
            self._maybe_fire()

    def set_disabled(self, disabled: bool) -> None:
        was = self.disabled
        self.disabled = disabled
        if was and not disabled:
            self._maybe_fire()

    def mask(self) -> None:
        self.masked = True

    def unmask(self) -> None:
        self.masked = False
        self._maybe_fire()

    def trigger(self) -> None:
        """The client asked for an interrupt (SET_IRQS ACTION_TRIGGER, no eventfd)."""
        if self.trigger_fd is not None and not self.masked:
            self._fire()

    def _maybe_fire(self) -> None:
        if self.asserted and not self.masked and self.trigger_fd is not None:
            self._fire()

    def _fire(self) -> None:
        assert self.trigger_fd is not None
        self.masked = True  # automasked until the client unmasks
        self.delivered += 1
        try:
            os.write(self.trigger_fd.fd, _ONE)
        except BlockingIOError:
            pass

    def set_trigger_fd(self, fd: OwnedFd | None) -> None:
        old, self.trigger_fd = self.trigger_fd, fd
        if old is not None and old is not fd:
            old.close()
        if fd is not None:
            self._maybe_fire()

    def set_unmask_fd(self, fd: OwnedFd | None) -> None:
        old, self.unmask_fd = self.unmask_fd, fd
        if old is not None and old is not fd:
            old.close()

    def reset(self) -> None:
        self.level = False
        self.disabled = False
        self.masked = False

    def close(self) -> None:
        self.set_trigger_fd(None)
        self.set_unmask_fd(None)
