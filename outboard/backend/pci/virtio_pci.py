"""virtio over PCI, modern (virtio 1.2, 4.1 "Virtio Over PCI Bus"), on a PciFunction.

The function has two memory BARs:

* BAR 4 (64-bit): the virtio structures, each in its own 4 KiB window — common
  configuration at 0x0000, ISR status at 0x1000, device configuration at
  0x2000 and the notification area at 0x3000 (one 4-byte slot per queue);
* BAR 1: the MSI-X table at 0 and its PBA on the page after the table.

Each structure is announced by a vendor-specific capability (4.1.4), next to
MSI-X, power management and PCI Express capabilities and a PCI configuration
access capability.

Feature negotiation and the status rules are ``DeviceState``'s; the queues run
on ``Runtime`` workers, each woken by the eventfd of its notification slot (the
client may register it as an ioeventfd so that a kick never crosses the
socket; a notification that does come as a region write is written to the same
eventfd). A queue's interrupt goes to its MSI-X vector, or, with MSI-X off,
sets ISR bit 0 and raises INTx.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..device import DeviceState
from ..errors import ChainError, DeviceError, GuestMemoryError
from ..fd import OwnedFd, close_all
from ..memory import GuestMemory
from ..runtime import Runtime
from ..virtio import DeviceStatus, VirtioDeviceId
from .capabilities import add_express, add_msix, add_power_management
from .config import BarKind, CapabilityId, ConfigSpace
from .function import Bar, IoEventFd, PciFunction
from .msix import MAX_VECTORS, Msix

__all__ = [
    "NO_VECTOR",
    "VIRTIO_PCI_VENDOR_ID",
    "CfgType",
    "VirtioPciFunction",
    "class_code_for",
    "pci_device_id_for",
]

log = logging.getLogger("outboard.virtio_pci")

VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: "0x1040 + the Virtio Device ID" (4.1.2.1 Device Requirements: PCI Device Discovery)
MODERN_DEVICE_ID_BASE = 0x1040
#: "Non-transitional devices SHOULD have a PCI Subsystem Device ID of 0x40 or higher"
SUBSYSTEM_ID_BASE = 0x40
#: "Non-transitional devices SHOULD have a PCI Revision ID of 1 or higher"
REVISION = 1
#: VIRTIO_MSI_NO_VECTOR
NO_VECTOR = 0xFFFF

VIRTIO_BAR = 4
MSIX_BAR = 1
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
WINDOW_SIZE = 0x1000
VIRTIO_BAR_SIZE = 0x4000
NOTIFY_OFF_MULTIPLIER = 4
#: the largest queue count the notification window holds
MAX_QUEUES = WINDOW_SIZE // NOTIFY_OFF_MULTIPLIER
PAGE = 0x1000

_ONE = (1).to_bytes(8, "little")

ISR_QUEUE = 1 << 0
ISR_CONFIG = 1 << 1


class CfgType(enum.IntEnum):
    """``cfg_type`` of a virtio PCI capability (4.1.4)."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5
    SHARED_MEMORY_CFG = 8
    VENDOR_CFG = 9


_OTHER = 0xFF0000
_CLASS_CODES: dict[int, int] = {
    VirtioDeviceId.NET: 0x020000,      # network: ethernet
    VirtioDeviceId.BLOCK: 0x010000,    # mass storage: SCSI (as QEMU)
    VirtioDeviceId.CONSOLE: 0x078000,  # communication: other
    VirtioDeviceId.SCSI: 0x010000,
    VirtioDeviceId.GPU: 0x038000,      # display: other
    VirtioDeviceId.INPUT: 0x098000,    # input: other
    VirtioDeviceId.FS: 0x018000,       # mass storage: other
}


def class_code_for(device_id: int) -> int:
    """The 24-bit class code (base, sub-class, programming interface) of a virtio type."""
    return _CLASS_CODES.get(device_id, _OTHER)


def pci_device_id_for(device_id: int) -> int:
    return MODERN_DEVICE_ID_BASE + device_id


@dataclass
class _QueueConfig:
    """What the driver wrote for one queue through the common configuration."""

    size: int
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


# struct virtio_pci_common_cfg (4.1.4.3): (name, offset, width)
COMMON_FIELDS = (
    ("device_feature_select", 0, 4),
    ("device_feature", 4, 4),
    ("driver_feature_select", 8, 4),
    ("driver_feature", 12, 4),
    ("config_msix_vector", 16, 2),
    ("num_queues", 18, 2),
    ("device_status", 20, 1),
    ("config_generation", 21, 1),
    ("queue_select", 22, 2),
    ("queue_size", 24, 2),
    ("queue_msix_vector", 26, 2),
    ("queue_enable", 28, 2),
    ("queue_notify_off", 30, 2),
    ("queue_desc", 32, 8),
    ("queue_driver", 40, 8),
    ("queue_device", 48, 8),
    ("queue_notif_config_data", 56, 2),
    ("queue_reset", 58, 2),
)
COMMON_CFG_SIZE = 64


def _virtio_cap(cfg_type: CfgType, offset: int, length: int, extra: bytes = b"") -> bytes:
    """The body of a ``struct virtio_pci_cap`` (after cap_vndr and cap_next)."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBBxxII", cap_len, cfg_type, VIRTIO_BAR, 0, offset, length) + extra


class VirtioPciFunction(PciFunction):
    """One virtio device as a modern virtio-pci function."""

    def __init__(self, state: DeviceState, runtime: Runtime, memory: GuestMemory, *,
                 msix_vectors: int | None = None) -> None:
        device = state.device
        num_queues = state.num_queues
        if num_queues > MAX_QUEUES:
            raise ValueError(f"{num_queues} queues (the notification area holds {MAX_QUEUES})")
        self.state = state
        self.runtime = runtime
        self.memory = memory
        self.device = device
        vectors = num_queues + 1 if msix_vectors is None else msix_vectors
        msix = Msix(min(max(vectors, 1), MAX_VECTORS))

        config = ConfigSpace()
        config.type0_header(
            vendor_id=VIRTIO_PCI_VENDOR_ID, device_id=pci_device_id_for(device.device_id),
            revision=REVISION, class_code=class_code_for(device.device_id),
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=SUBSYSTEM_ID_BASE + device.device_id)

        virtio_bar = Bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, BarKind.MEMORY64)
        table_pages = (msix.table_size + PAGE - 1) // PAGE
        self.pba_offset = table_pages * PAGE
        msix_bar_size = 1 << (self.pba_offset + PAGE - 1).bit_length()
        msix_bar = Bar(MSIX_BAR, msix_bar_size)
        super().__init__(config, [msix_bar, virtio_bar], msix=msix)
        self.msix: Msix = msix

        # -- the BARs' windows --
        config_size = len(device.config())
        virtio_bar.add("common", COMMON_OFFSET, WINDOW_SIZE, self._common_read,
                       self._common_write)
        virtio_bar.add("isr", ISR_OFFSET, WINDOW_SIZE, self._isr_read, _ignore)
        if config_size:
            virtio_bar.add("device", DEVICE_OFFSET, WINDOW_SIZE, self._device_read,
                           self._device_write)
        virtio_bar.add("notify", NOTIFY_OFFSET, WINDOW_SIZE, _zeros, self._notify_write)
        msix_bar.add("msix-table", 0, msix.table_size, msix.read_table, msix.write_table)
        msix_bar.add("msix-pba", self.pba_offset, msix.pba_size, msix.read_pba, _ignore)

        # -- the capability list --
        self.msix_cap = add_msix(config, msix, table_bar=MSIX_BAR, table_offset=0,
                                 pba_bar=MSIX_BAR, pba_offset=self.pba_offset)
        self.pm_cap = add_power_management(config)
        self.express_cap = add_express(config)
        vendor = CapabilityId.VENDOR_SPECIFIC
        self.common_cap = config.add_capability(
            vendor, _virtio_cap(CfgType.COMMON_CFG, COMMON_OFFSET, COMMON_CFG_SIZE))
        self.notify_cap = config.add_capability(
            vendor, _virtio_cap(CfgType.NOTIFY_CFG, NOTIFY_OFFSET,
                                NOTIFY_OFF_MULTIPLIER * num_queues,
                                struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        self.isr_cap = config.add_capability(vendor, _virtio_cap(CfgType.ISR_CFG, ISR_OFFSET, 1))
        self.device_cap = config.add_capability(
            vendor, _virtio_cap(CfgType.DEVICE_CFG, DEVICE_OFFSET, config_size)) \
            if config_size else 0
        # "The device MUST present at least one VIRTIO_PCI_CAP_PCI_CFG capability"
        # (4.1.4.9): bar, offset and length are writable, then the data window.
        pci_cfg_body = _virtio_cap(CfgType.PCI_CFG, 0, 0, bytes(4))
        pci_cfg_mask = bytes(2) + b"\xff" + bytes(3) + b"\xff" * 12
        self.pci_cfg_cap = config.add_capability(vendor, pci_cfg_body, wmask=pci_cfg_mask)
        data = self.pci_cfg_cap + 16
        config.on_read(data, 4, self._pci_cfg_read)
        config.on_write(data, 4, self._pci_cfg_write)
        config.seal()

        # -- virtio state --
        self._notify_fds = [OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                            for _ in range(num_queues)]
        self._queues = [_QueueConfig(q.max_size) for q in state.queues]
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._queue_select = 0
        self._config_vector = NO_VECTOR
        self._generation = 0
        self._isr = 0
        self._getters: dict[str, Callable[[], int]] = {}
        self._setters: dict[str, Callable[[int], None]] = {}
        for name, _, _ in COMMON_FIELDS:
            self._getters[name] = getattr(self, f"_get_{name}")
            setter = getattr(self, f"_set_{name}", None)
            if setter is not None:
                self._setters[name] = setter
        device.set_config_notifier(self.config_changed)

    # -- common configuration (4.1.4.3) -------------------------------------

    def _common_read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        for name, at, width in COMMON_FIELDS:
            start, stop = max(offset, at), min(offset + size, at + width)
            if start < stop:
                value = self._getters[name]().to_bytes(width, "little")
                out[start - offset:stop - offset] = value[start - at:stop - at]
        return bytes(out)

    def _common_write(self, offset: int, data: bytes) -> None:
        # A write may cover part of a field (a 64-bit address in two halves) or
        # several fields: each field touched is read, patched and written back.
        for name, at, width in COMMON_FIELDS:
            start, stop = max(offset, at), min(offset + len(data), at + width)
            if start >= stop:
                continue
            setter = self._setters.get(name)
            if setter is None:
                log.debug("write to read-only %s ignored", name)
                continue
            value = bytearray(self._getters[name]().to_bytes(width, "little"))
            value[start - at:stop - at] = data[start - offset:stop - offset]
            setter(int.from_bytes(value, "little"))

    def _get_device_feature_select(self) -> int:
        return self._device_feature_select

    def _set_device_feature_select(self, value: int) -> None:
        self._device_feature_select = value

    def _get_device_feature(self) -> int:
        select = self._device_feature_select
        return (self.state.offered >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0

    def _get_driver_feature_select(self) -> int:
        return self._driver_feature_select

    def _set_driver_feature_select(self, value: int) -> None:
        self._driver_feature_select = value

    def _get_driver_feature(self) -> int:
        select = self._driver_feature_select
        return (self._driver_features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0

    def _set_driver_feature(self, value: int) -> None:
        select = self._driver_feature_select
        if select >= 2:
            return
        if self.state.status & DeviceStatus.FEATURES_OK:
            log.warning("driver features written after FEATURES_OK; ignored")
            return
        shift = 32 * select
        self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) \
            | value << shift

    def _vector(self, value: int) -> int:
        """"The device MUST return vector mapped ... or NO_VECTOR if unable to
        map" (4.1.4.3.1): a vector the table does not have reads back as NO_VECTOR."""
        return value if value < self.msix.count else NO_VECTOR

    def _get_config_msix_vector(self) -> int:
        return self._config_vector

    def _set_config_msix_vector(self, value: int) -> None:
        self._config_vector = self._vector(value)

    def _get_num_queues(self) -> int:
        return self.state.num_queues

    def _get_device_status(self) -> int:
        return int(self.state.status)

    def _set_device_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            # "The device MUST reset when 0 is written to device_status, and
            # present a 0 in device_status once that is done."
            self.reset_device()
            return
        state = self.state
        old = state.status
        if value & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK:
            try:
                state.set_features(self._driver_features)
            except DeviceError as exc:
                log.warning("refusing FEATURES_OK: %s", exc)
                value &= ~int(DeviceStatus.FEATURES_OK)
        try:
            state.set_status(value)
        except DeviceError as exc:
            log.warning("status write %#x refused: %s", value, exc)
            return
        if state.status & DeviceStatus.DRIVER_OK and not old & DeviceStatus.DRIVER_OK:
            log.info("driver ready: features %#x", state.features)
            for index in range(state.num_queues):
                self._start_queue(index)

    def _get_config_generation(self) -> int:
        return self._generation & 0xFF

    def _get_queue_select(self) -> int:
        return self._queue_select

    def _set_queue_select(self, value: int) -> None:
        self._queue_select = value

    def _selected(self) -> _QueueConfig | None:
        select = self._queue_select
        return self._queues[select] if select < len(self._queues) else None

    def _writable_queue(self, field: str) -> _QueueConfig | None:
        queue = self._selected()
        if queue is None:
            log.debug("%s written for missing queue %d", field, self._queue_select)
            return None
        if queue.enabled:
            log.warning("%s written for enabled queue %d; ignored", field, self._queue_select)
            return None
        return queue

    def _get_queue_size(self) -> int:
        queue = self._selected()
        return queue.size if queue is not None else 0

    def _set_queue_size(self, value: int) -> None:
        queue = self._writable_queue("queue_size")
        if queue is not None:
            queue.size = value

    def _get_queue_msix_vector(self) -> int:
        queue = self._selected()
        return queue.msix_vector if queue is not None else NO_VECTOR

    def _set_queue_msix_vector(self, value: int) -> None:
        queue = self._selected()
        if queue is not None:
            queue.msix_vector = self._vector(value)

    def _get_queue_enable(self) -> int:
        queue = self._selected()
        return int(queue is not None and queue.enabled)

    def _set_queue_enable(self, value: int) -> None:
        if not value:
            # "The driver MUST NOT write a 0 to queue_enable" (4.1.4.3.2).
            log.warning("queue %d: queue_enable written with 0; ignored", self._queue_select)
            return
        if self._writable_queue("queue_enable") is not None:
            self._enable_queue(self._queue_select)

    def _get_queue_notify_off(self) -> int:
        return self._queue_select if self._selected() is not None else 0

    def _get_queue_desc(self) -> int:
        queue = self._selected()
        return queue.desc if queue is not None else 0

    def _set_queue_desc(self, value: int) -> None:
        queue = self._writable_queue("queue_desc")
        if queue is not None:
            queue.desc = value

    def _get_queue_driver(self) -> int:
        queue = self._selected()
        return queue.driver if queue is not None else 0

    def _set_queue_driver(self, value: int) -> None:
        queue = self._writable_queue("queue_driver")
        if queue is not None:
            queue.driver = value

    def _get_queue_device(self) -> int:
        queue = self._selected()
        return queue.device if queue is not None else 0

    def _set_queue_device(self, value: int) -> None:
        queue = self._writable_queue("queue_device")
        if queue is not None:
            queue.device = value

    def _get_queue_notif_config_data(self) -> int:
        return 0

    def _get_queue_reset(self) -> int:
        return 0

    # -- queues ------------------------------------------------------------

    def _enable_queue(self, index: int) -> None:
        config = self._queues[index]
        queue = self.state.queues[index]
        try:
            queue.set_size(config.size)
            queue.setup(self.memory, config.desc, config.driver, config.device)
        except (ChainError, GuestMemoryError) as exc:
            log.warning("queue %d cannot be enabled: %s", index, exc)
            self.state.needs_reset()
            self.config_changed()
            return
        config.enabled = True
        log.info("queue %d enabled: size %d, vector %s", index, queue.size,
                 "none" if config.msix_vector == NO_VECTOR else config.msix_vector)
        if self.state.status & DeviceStatus.DRIVER_OK:
            self._start_queue(index)

    def _start_queue(self, index: int) -> None:
        """Run queue ``index`` if it is enabled, mapped and not running yet.

        "The device MUST NOT consume buffers ... before DRIVER_OK" (3.1.2), so
        this happens at DRIVER_OK, or at queue_enable after it.
        """
        runner = self.runtime.runners[index]
        if runner.running or not self._queues[index].enabled:
            return
        if not self.state.queues[index].ready:
            return
        # The runner borrows the notification eventfd; the function owns it.
        runner.kick = self._notify_fds[index]
        runner.interrupt = lambda: self._queue_interrupt(index)
        self.runtime.start(index)

    def _queue_interrupt(self, index: int) -> None:
        self._interrupt(ISR_QUEUE, self._queues[index].msix_vector)

    def memory_changed(self) -> None:
        """The DMA mappings changed: point every enabled queue at its rings again.

        A queue whose rings are no longer mapped stops until they are.
        """
        for index, config in enumerate(self._queues):
            if not config.enabled:
                continue
            queue = self.state.queues[index]
            queue.release()
            try:
                queue.setup(self.memory, config.desc, config.driver, config.device)
            except GuestMemoryError as exc:
                # QEMU unmaps and maps again around every change of its memory
                # map: a queue between the two waits for the map.
                log.info("queue %d: rings not mapped, stopped until they are: %s", index, exc)
                self.runtime.runners[index].stop()
                continue
            if self.state.status & DeviceStatus.DRIVER_OK:
                self._start_queue(index)

    def ioeventfds(self, index: int) -> list[IoEventFd]:
        """The notification slots: a 16-bit write of the queue index (4.1.4.4)."""
        if index != VIRTIO_BAR:
            return []
        return [IoEventFd(NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue, 2, fd)
                for queue, fd in enumerate(self._notify_fds)]

    def _notify_write(self, offset: int, data: bytes) -> None:
        index = offset // NOTIFY_OFF_MULTIPLIER
        if index >= len(self._notify_fds):
            log.warning("notification for missing queue %d", index)
            return
        try:
            os.write(self._notify_fds[index].fd, _ONE)
        except BlockingIOError:
            pass  # saturated: the worker has a wake-up pending

    # -- interrupts --------------------------------------------------------

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        """4.1.5.3/4.1.5.4: with MSI-X enabled, the vector (if any); without,
        set the ISR bit and assert INTx."""
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.trigger(vector)
            return
        self._isr |= isr_bit
        self.intx.set_level(True)

    def config_changed(self) -> None:
        """The device configuration changed: a new generation and a config interrupt."""
        self._generation += 1
        self._interrupt(ISR_CONFIG, self._config_vector)

    def _isr_read(self, offset: int, size: int) -> bytes:
        if offset != 0:
            return bytes(size)
        # "simply reading this register resets it to 0 and causes the device to
        # deassert the interrupt" (4.1.4.5).
        value, self._isr = self._isr, 0
        self.intx.set_level(False)
        return bytes([value]) + bytes(size - 1)

    @property
    def isr(self) -> int:
        return self._isr

    # -- device configuration ----------------------------------------------

    def _device_read(self, offset: int, size: int) -> bytes:
        config = self.device.config()
        return config[offset:offset + size].ljust(size, b"\0")

    def _device_write(self, offset: int, data: bytes) -> None:
        try:
            self.device.write_config(offset, data)
        except DeviceError as exc:
            log.warning("device config write refused: %s", exc)

    # -- the PCI configuration access capability (4.1.4.9) -------------------

    def _pci_cfg_access(self) -> tuple[int, int, int] | None:
        cap = self.pci_cfg_cap
        bar = self.config.u8(cap + 4)
        offset = self.config.u32(cap + 8)
        length = self.config.u32(cap + 12)
        if length not in (1, 2, 4) or offset % length or bar not in self.bars \
                or offset + length > self.bars[bar].size:
            log.warning("PCI configuration access to BAR %d at %#x+%d refused",
                        bar, offset, length)
            return None
        return bar, offset, length

    def _pci_cfg_read(self, offset: int, size: int) -> None:
        data = self.pci_cfg_cap + 16
        if offset < data or offset + size > data + 4:
            return  # a read of more than the window (a dump) has no side effects
        access = self._pci_cfg_access()
        if access is not None:
            bar, at, length = access
            value = self.bar_read(bar, at, length)
            self.config.data[data:data + length] = value

    def _pci_cfg_write(self, offset: int, size: int) -> None:
        access = self._pci_cfg_access()
        if access is not None:
            bar, at, length = access
            data = self.pci_cfg_cap + 16
            self.bar_write(bar, at, bytes(self.config.data[data:data + length]))

    # -- life cycle --------------------------------------------------------

    def reset_device(self) -> None:
        """The virtio reset (status 0): queues stopped and forgotten, features
        and status cleared; interrupts already pending for them are withdrawn."""
        self.runtime.stop_all()
        for runner in self.runtime.runners:
            runner.kick = None  # borrowed from self._notify_fds
        vectors = {q.msix_vector for q in self._queues} | {self._config_vector}
        self.state.reset()
        self._queues = [_QueueConfig(q.max_size) for q in self.state.queues]
        self._device_feature_select = self._driver_feature_select = 0
        self._driver_features = 0
        self._queue_select = 0
        self._config_vector = NO_VECTOR
        self._isr = 0
        self.intx.set_level(False)
        for vector in vectors - {NO_VECTOR}:
            self.msix.withdraw(vector)

    def reset(self) -> None:
        """A function-level reset: the virtio reset and the PCI one."""
        self.reset_device()
        super().reset()

    def close(self) -> None:
        self.reset_device()
        if self.device.config_notifier == self.config_changed:
            self.device.set_config_notifier(None)
        close_all(self._notify_fds)
        super().close()


def _ignore(offset: int, data: bytes) -> None:
    pass


def _zeros(offset: int, size: int) -> bytes:
    return bytes(size)
