"""The device author's API, and the framework state every device shares.

A device author subclasses ``VirtioDevice``: a device id, its queues, its feature
bits, its config space, and ``process(queue)``. Feature negotiation, the status
rules and the queues themselves live in ``DeviceState``, which the transports
drive; a device never learns which transport carries it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from .errors import DeviceError
from .virtio import DeviceStatus, Feature, bit
from .virtqueue import SplitQueue

__all__ = ["FRAMEWORK_FEATURES", "DeviceState", "QueueSpec", "VirtioDevice"]

log = logging.getLogger("outboard.device")

# What the framework itself implements for every device.
FRAMEWORK_FEATURES = (
    bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX)
)


@dataclass(frozen=True)
class QueueSpec:
    """One virtqueue a device declares."""

    name: str
    max_size: int = 256


class VirtioDevice:
    """Base class for a device model. Override what your device needs.

    ``process`` is called with the queue whenever the driver has made buffers
    available (and once when the queue starts). Pop chains until ``pop``
    returns None (or iterate the queue), and ``push`` each one back with the
    number of bytes written. The framework publishes and interrupts once per
    batch.
    """

    device_id: ClassVar[int]
    #: the vhost-user back-end type name (docs/interop/vhost-user.json)
    type_name: ClassVar[str] = ""
    #: device-specific feature bits offered to the driver
    features: int = 0
    #: framework feature bits this device offers (drop bits it cannot honour)
    framework_features: int = FRAMEWORK_FEATURES
    #: serve each queue from a process of its own (vhost-user; see
    #: ``backend.workers``). Only for a device whose ``process`` needs nothing
    #: from the other queues or from tasks of its own, and that names the fds
    #: its queues use in ``queue_fds``.
    queue_processes: bool = False

    def __init__(self) -> None:
        self.driver_features = 0
        self._config_changed: Callable[[], None] | None = None
        self._settings_changed: Callable[[], None] | None = None
        #: the queues of the current connection (see ``bind``)
        self.virtqueues: Sequence[SplitQueue] = ()

    @property
    def queues(self) -> Sequence[QueueSpec]:
        raise NotImplementedError

    def config(self) -> bytes:
        """The device config space, as the driver reads it now."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset``; refuse by raising DeviceError."""
        raise DeviceError(f"config space is read-only (write of {len(data)} bytes at {offset})")

    def validate_features(self, features: int) -> str | None:
        """Return why ``features`` is unacceptable, or None (checked at FEATURES_OK)."""
        return None

    def activate(self, features: int) -> None:
        """The driver accepted ``features``; called before any queue runs."""
        self.driver_features = features

    def process(self, queue: SplitQueue) -> None:
        raise NotImplementedError

    def bind(self, queues: Sequence[SplitQueue]) -> None:
        """The framework made ``queues`` for a new connection (one per QueueSpec)."""
        self.virtqueues = queues

    async def run(self) -> None:
        """Optional background work for the life of a connection (a device that
        receives from outside, say). Cancelled when the connection ends. Use
        ``queue.active``, ``queue.pop``/``push`` and ``queue.flush()``."""

    def reset(self) -> None:
        """Back to the state after construction (the driver reset the device)."""
        self.driver_features = 0

    def close(self) -> None:
        """Release what the device holds (files, sockets); it will not run again."""

    def queue_fds(self) -> Sequence[int]:
        """The fds ``process`` uses (an image file, say): a queue process keeps
        these and closes every other fd it inherited."""
        return ()

    # With ``queue_processes``: which queues share a process, and what such a
    # process does besides draining its queues.

    def queue_group(self, index: int) -> int | None:
        """The process queue ``index`` is served by: queues with the same number
        share one; None keeps the queue in the main process (a control queue
        that changes the device's settings)."""
        return index

    def group_fds(self, group: int) -> Sequence[int]:
        """fds whose readiness should wake the process of ``group`` now (a tap
        with room in the receive ring, say); asked before every wait."""
        return ()

    def group_poll(self, group: int) -> bool:
        """Work of the process of ``group`` besides its queues (read from a
        port), done after every wake-up; True to be called again without
        waiting."""
        return False

    def settings_changed(self) -> None:
        """The device's settings changed outside the queue processes (a control
        queue command): they start afresh from the new settings."""
        if self._settings_changed is not None:
            self._settings_changed()

    def set_settings_notifier(self, notifier: Callable[[], None] | None) -> None:
        """For transports: what ``settings_changed`` does (None: nothing)."""
        self._settings_changed = notifier

    def has_feature(self, feature: int) -> bool:
        return bool(self.driver_features >> feature & 1)

    def config_changed(self) -> None:
        """Tell the driver the config space changed (a config interrupt)."""
        if self._config_changed is not None:
            self._config_changed()

    def set_config_notifier(self, notifier: Callable[[], None] | None) -> None:
        """For transports: how ``config_changed`` reaches the driver (None: nowhere)."""
        self._config_changed = notifier

    @property
    def config_notifier(self) -> Callable[[], None] | None:
        return self._config_changed


class DeviceState:
    """The framework half of a device: features, status, queues."""

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.offered = device.features | device.framework_features
        self.queues = [SplitQueue(i, spec.max_size) for i, spec in enumerate(device.queues)]
        device.bind(self.queues)
        self.features = 0
        self.features_set = False
        self.status = DeviceStatus(0)

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def queue(self, index: int) -> SplitQueue:
        if not 0 <= index < len(self.queues):
            raise DeviceError(f"no queue {index} (the device has {len(self.queues)})")
        return self.queues[index]

    def set_features(self, features: int) -> None:
        """The driver's accepted features; bits never offered are refused."""
        extra = features & ~self.offered
        if extra:
            raise DeviceError(f"driver accepted feature bits never offered: {extra:#x}")
        self.features = features
        self.features_set = True
        event_idx = bool(features >> Feature.RING_EVENT_IDX & 1)
        indirect = bool(features >> Feature.RING_INDIRECT_DESC & 1)
        for q in self.queues:
            q.set_features(event_idx=event_idx, indirect=indirect)
        self.device.activate(features)

    def set_status(self, value: int) -> None:
        """Apply a status write with the rules of virtio 1.2, 2.1 and 3.1."""
        new = DeviceStatus(value & 0xFF)
        if new == 0:
            self.reset()
            return
        old = self.status
        if old & ~new & ~DeviceStatus.DEVICE_NEEDS_RESET:
            raise DeviceError(f"driver cleared status bits {old & ~new!r} without a reset")
        if new & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK:
            why = self._features_problem()
            if why is not None:
                log.warning("refusing FEATURES_OK: %s", why)
                new &= ~DeviceStatus.FEATURES_OK
        self.status = new

    def _features_problem(self) -> str | None:
        if not self.features >> Feature.VERSION_1 & 1:
            return "VIRTIO_F_VERSION_1 not accepted (legacy drivers are not supported)"
        return self.device.validate_features(self.features)

    def needs_reset(self) -> None:
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET

    def reset(self) -> None:
        for q in self.queues:
            q.reset()
        self.features = 0
        self.features_set = False
        self.status = DeviceStatus(0)
        self.device.reset()
