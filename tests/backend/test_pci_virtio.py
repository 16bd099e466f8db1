"""virtio-pci (modern) on a PCI function: common configuration, notifications,
ISR and INTx, MSI-X routing, device configuration, the PCI configuration access
capability, resets and DMA mapping changes — driven straight through BAR and
config space accesses, without a transport."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from outboard.backend import DeviceState, DeviceStatus, Feature, VirtioDevice, bit
from outboard.backend.fd import OwnedFd
from outboard.backend.memory import GuestMemory, MemoryRegion
from outboard.backend.pci.virtio_pci import (
    COMMON_OFFSET,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MSIX_BAR,
    NO_VECTOR,
    NOTIFY_OFFSET,
    VIRTIO_BAR,
    VirtioPciFunction,
)
from outboard.backend.runtime import Runtime
from outboard.devices.blk import BlkDevice
from outboard.devices.rng import RngDevice
from outboard.testing import Buffer, DriverQueue, GuestRam

pytestmark = pytest.mark.usefixtures("fd_leak_check")

COMMON = {
    "device_feature_select": (0, 4), "device_feature": (4, 4),
    "driver_feature_select": (8, 4), "driver_feature": (12, 4),
    "config_msix_vector": (16, 2), "num_queues": (18, 2), "device_status": (20, 1),
    "config_generation": (21, 1), "queue_select": (22, 2), "queue_size": (24, 2),
    "queue_msix_vector": (26, 2), "queue_enable": (28, 2), "queue_notify_off": (30, 2),
    "queue_desc": (32, 8), "queue_driver": (40, 8), "queue_device": (48, 8),
    "queue_notif_config_data": (56, 2), "queue_reset": (58, 2),
}
A, D, FOK, DOK = (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER, DeviceStatus.FEATURES_OK,
                  DeviceStatus.DRIVER_OK)


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))


def fired(fd: OwnedFd) -> int:
    try:
        return int.from_bytes(os.read(fd.fd, 8), "little")
    except BlockingIOError:
        return 0


@dataclass
class Rig:
    """A virtio-pci function over guest RAM, with an eventfd per MSI-X vector."""

    function: VirtioPciFunction
    state: DeviceState
    ram: GuestRam
    vectors: list[OwnedFd]
    intx: OwnedFd

    def read(self, field: str) -> int:
        offset, width = COMMON[field]
        return int.from_bytes(self.function.bar_read(VIRTIO_BAR, COMMON_OFFSET + offset, width),
                              "little")

    def write(self, field: str, value: int) -> None:
        offset, width = COMMON[field]
        self.function.bar_write(VIRTIO_BAR, COMMON_OFFSET + offset,
                                value.to_bytes(width, "little"))

    def isr(self) -> int:
        return self.function.bar_read(VIRTIO_BAR, ISR_OFFSET, 1)[0]

    def notify(self, queue: int) -> None:
        self.function.bar_write(VIRTIO_BAR, NOTIFY_OFFSET + 4 * queue,
                                queue.to_bytes(2, "little"))

    def enable_msix(self) -> None:
        cap = self.function.msix_cap
        self.function.config.write(cap + 2, (1 << 15).to_bytes(2, "little"))
        for vector in range(self.function.msix.count):
            self.function.bar_write(MSIX_BAR, 16 * vector,
                                    struct.pack("<QII", 0xFEE0_0000, vector, 0))

    def negotiate(self, features: int | None = None) -> None:
        self.write("device_status", A)
        self.write("device_status", A | D)
        offered = 0
        for select in (0, 1):
            self.write("device_feature_select", select)
            offered |= self.read("device_feature") << (32 * select)
        features = offered if features is None else features
        for select in (0, 1):
            self.write("driver_feature_select", select)
            self.write("driver_feature", features >> (32 * select) & 0xFFFF_FFFF)
        self.write("device_status", A | D | FOK)

    def add_queue(self, index: int, size: int = 8, vector: int | None = None) -> DriverQueue:
        q = DriverQueue(self.ram, size)
        self.write("queue_select", index)
        self.write("queue_size", size)
        self.write("queue_msix_vector", index + 1 if vector is None else vector)
        self.write("queue_desc", q.desc_gpa)
        self.write("queue_driver", q.avail_gpa)
        self.write("queue_device", q.used_gpa)
        self.write("queue_enable", 1)
        return q


@pytest.fixture
async def make_rig() -> AsyncIterator[object]:
    rigs: list[Rig] = []
    async with trio.open_nursery() as nursery:
        def make(device: VirtioDevice, *, ram_size: int = 1 << 20) -> Rig:
            state = DeviceState(device)
            ram = GuestRam(ram_size, gpa=0x10_0000)
            memory = GuestMemory([MemoryRegion.from_buffer(ram.spec, ram._map)])
            function = VirtioPciFunction(state, Runtime(state, nursery), memory)
            vectors = [eventfd() for _ in range(function.msix.count)]
            for vector, fd in enumerate(vectors):
                function.msix.set_eventfd(vector, OwnedFd(os.dup(fd.fd)))
            intx = eventfd()
            function.intx.set_trigger_fd(OwnedFd(os.dup(intx.fd)))
            rig = Rig(function, state, ram, vectors, intx)
            rigs.append(rig)
            return rig
        yield make
        for rig in rigs:
            rig.function.close()
            rig.function.memory.clear()
            rig.ram.close()
            for fd in [*rig.vectors, rig.intx]:
                fd.close()
        nursery.cancel_scope.cancel()


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return str(path)


# -- common configuration ------------------------------------------------------------


async def test_feature_windows(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    offered = rig.state.offered
    for select, expected in ((0, offered & 0xFFFF_FFFF), (1, offered >> 32), (2, 0)):
        rig.write("device_feature_select", select)
        assert rig.read("device_feature_select") == select
        assert rig.read("device_feature") == expected
    rig.write("device_feature", 0)  # read-only
    rig.write("device_feature_select", 1)
    assert rig.read("device_feature") == offered >> 32
    rig.write("driver_feature_select", 1)
    rig.write("driver_feature", 1)
    rig.write("driver_feature_select", 0)
    assert rig.read("driver_feature") == 0
    rig.write("driver_feature_select", 1)
    assert rig.read("driver_feature") == 1


async def test_features_ok_with_the_accepted_features(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate(bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX))
    assert rig.read("device_status") == A | D | FOK
    assert rig.state.features == bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX)
    assert rig.state.queues[0].event_idx


@pytest.mark.parametrize("features", [0, bit(Feature.VERSION_1) | bit(Feature.RING_PACKED)],
                         ids=["legacy", "never-offered"])
async def test_features_ok_is_refused_for_bad_features(make_rig: object, features: int) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate(features)
    assert not rig.read("device_status") & FOK


async def test_driver_features_are_frozen_after_features_ok(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate(bit(Feature.VERSION_1))
    rig.write("driver_feature_select", 0)
    rig.write("driver_feature", bit(Feature.RING_EVENT_IDX))
    assert rig.read("driver_feature") == 0


async def test_queue_fields(make_rig: object, image: str) -> None:
    device = BlkDevice(image, num_queues=2, queue_size=64)
    rig: Rig = make_rig(device)  # type: ignore[operator]
    assert rig.read("num_queues") == 2
    for index in (0, 1):
        rig.write("queue_select", index)
        assert rig.read("queue_size") == 64  # the maximum, until the driver writes
        assert rig.read("queue_notify_off") == index
        assert rig.read("queue_enable") == 0
        assert rig.read("queue_msix_vector") == NO_VECTOR
    rig.write("queue_select", 5)  # no such queue: reads zero, writes go nowhere
    assert rig.read("queue_size") == 0
    rig.write("queue_size", 16)
    assert rig.read("queue_size") == 0
    assert rig.read("queue_notif_config_data") == 0 and rig.read("queue_reset") == 0
    device.close()


async def test_64_bit_addresses_in_two_halves(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    offset, _ = COMMON["queue_desc"]
    rig.function.bar_write(VIRTIO_BAR, offset, (0x89AB_CDEF).to_bytes(4, "little"))
    rig.function.bar_write(VIRTIO_BAR, offset + 4, (0x0123_4567).to_bytes(4, "little"))
    assert rig.read("queue_desc") == 0x0123_4567_89AB_CDEF


async def test_unmappable_vector_reads_back_as_no_vector(make_rig: object) -> None:
    """"MUST return vector mapped ... or NO_VECTOR if unable to map" (4.1.4.3.1)."""
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    count = rig.function.msix.count
    rig.write("config_msix_vector", count)
    assert rig.read("config_msix_vector") == NO_VECTOR
    rig.write("config_msix_vector", count - 1)
    assert rig.read("config_msix_vector") == count - 1
    rig.write("queue_msix_vector", 0x1234)
    assert rig.read("queue_msix_vector") == NO_VECTOR


async def test_queue_fields_are_frozen_once_enabled(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate()
    q = rig.add_queue(0)
    rig.write("queue_size", 4)
    rig.write("queue_desc", 0)
    rig.write("queue_enable", 0)  # "The driver MUST NOT write a 0 to queue_enable"
    assert rig.read("queue_size") == 8
    assert rig.read("queue_desc") == q.desc_gpa
    assert rig.read("queue_enable") == 1


async def test_enabling_a_queue_outside_memory_needs_a_reset(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.enable_msix()
    rig.write("config_msix_vector", 0)
    rig.negotiate()
    rig.write("queue_select", 0)
    rig.write("queue_size", 8)
    rig.write("queue_desc", 0x10)  # below the RAM
    rig.write("queue_enable", 1)
    assert rig.read("queue_enable") == 0
    assert rig.read("device_status") & DeviceStatus.DEVICE_NEEDS_RESET
    assert fired(rig.vectors[0]) == 1  # the config interrupt
    assert rig.read("config_generation") == 1


async def test_status_zero_resets_the_device(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate()
    rig.add_queue(0)
    rig.write("config_msix_vector", 0)
    rig.write("device_status", A | D | FOK | DOK)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.function.runtime.runners[0].running
    rig.write("device_status", 0)
    assert rig.read("device_status") == 0
    assert rig.state.features == 0
    assert not rig.function.runtime.runners[0].running
    assert rig.read("config_msix_vector") == NO_VECTOR
    rig.write("queue_select", 0)
    assert rig.read("queue_enable") == 0
    assert rig.read("queue_msix_vector") == NO_VECTOR
    assert rig.read("queue_size") == 256


# -- the data path -----------------------------------------------------------------------


async def run_rng_request(rig: Rig, q: DriverQueue, queue: int = 0) -> None:
    buf = rig.ram.alloc(16)
    q.offer([Buffer(buf, 16, writable=True)])
    q.publish()
    rig.notify(queue)
    await trio.testing.wait_all_tasks_blocked()


async def test_a_request_completes_with_its_msix_vector(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.enable_msix()
    rig.negotiate()
    q = rig.add_queue(0)
    rig.write("device_status", A | D | FOK | DOK)
    await run_rng_request(rig, q)
    assert [u.written for u in q.collect()] == [16]
    assert fired(rig.vectors[1]) == 1
    assert fired(rig.vectors[0]) == 0
    assert rig.function.isr == 0  # with MSI-X on, the ISR stays untouched


async def test_no_queue_runs_before_driver_ok(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.enable_msix()
    rig.negotiate()
    q = rig.add_queue(0)
    await run_rng_request(rig, q)
    assert q.collect() == []
    rig.write("device_status", A | D | FOK | DOK)
    await trio.testing.wait_all_tasks_blocked()
    assert len(q.collect()) == 1  # the kick that came early was not lost


async def test_no_vector_means_no_interrupt(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.enable_msix()
    rig.negotiate()
    q = rig.add_queue(0, vector=NO_VECTOR)
    rig.write("device_status", A | D | FOK | DOK)
    await run_rng_request(rig, q)
    assert len(q.collect()) == 1
    assert sum(fired(fd) for fd in rig.vectors) == 0


async def test_intx_and_isr_read_to_clear_without_msix(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate()
    q = rig.add_queue(0)
    rig.write("device_status", A | D | FOK | DOK)
    await run_rng_request(rig, q)
    assert len(q.collect()) == 1
    assert fired(rig.intx) == 1
    assert rig.function.intx.asserted and rig.function.intx.masked  # automasked
    await run_rng_request(rig, q)
    assert fired(rig.intx) == 0  # still masked: the line is already up
    assert rig.isr() == 1
    assert rig.isr() == 0  # read to clear
    assert not rig.function.intx.level
    rig.function.intx.unmask()  # the client's EOI
    assert fired(rig.intx) == 0  # nothing pending any more


async def test_intx_fires_again_on_unmask_while_the_isr_is_set(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate()
    q = rig.add_queue(0)
    rig.write("device_status", A | D | FOK | DOK)
    await run_rng_request(rig, q)
    assert fired(rig.intx) == 1
    rig.function.intx.unmask()  # EOI without reading the ISR: the level is still high
    assert fired(rig.intx) == 1


async def test_config_change_interrupt(make_rig: object) -> None:
    device = RngDevice()
    rig: Rig = make_rig(device)  # type: ignore[operator]
    device.config_changed()  # MSI-X off: ISR bit 1 and INTx
    assert rig.read("config_generation") == 1
    assert fired(rig.intx) == 1
    assert rig.isr() == 2
    rig.enable_msix()
    rig.write("config_msix_vector", 0)
    device.config_changed()
    assert rig.read("config_generation") == 2
    assert fired(rig.vectors[0]) == 1
    assert rig.isr() == 0


async def test_notification_eventfds_are_the_queues_kick_fds(make_rig: object,
                                                             image: str) -> None:
    device = BlkDevice(image, num_queues=2)
    rig: Rig = make_rig(device)  # type: ignore[operator]
    io = rig.function.ioeventfds(VIRTIO_BAR)
    assert [(e.offset, e.size) for e in io] == [(NOTIFY_OFFSET, 2), (NOTIFY_OFFSET + 4, 2)]
    assert rig.function.ioeventfds(MSIX_BAR) == []
    rig.enable_msix()
    rig.negotiate()
    q = rig.add_queue(1)
    rig.write("device_status", A | D | FOK | DOK)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.function.runtime.runners[1].kick is io[1].fd
    fired(rig.vectors[2])  # the runtime's first publish may interrupt once: spurious
    # A kick straight into the eventfd, as KVM would do it, never touching the BAR.
    header, status = rig.ram.alloc(16), rig.ram.alloc(1)
    rig.ram.write(header, struct.pack("<IIQ", 8, 0, 0))  # GET_ID
    ident = rig.ram.alloc(20)
    q.offer([Buffer(header, 16), Buffer(ident, 20, writable=True),
             Buffer(status, 1, writable=True)])
    q.publish()
    os.write(io[1].fd.fd, (1).to_bytes(8, "little"))
    await trio.testing.wait_all_tasks_blocked()
    assert len(q.collect()) == 1
    assert fired(rig.vectors[2]) == 1
    device.close()


async def test_device_config_reads_and_writes(make_rig: object, image: str) -> None:
    device = BlkDevice(image)
    rig: Rig = make_rig(device)  # type: ignore[operator]
    data = rig.function.bar_read(VIRTIO_BAR, DEVICE_OFFSET, 8)
    assert int.from_bytes(data, "little") == (1 << 20) // 512
    assert rig.function.bar_read(VIRTIO_BAR, DEVICE_OFFSET + 0x800, 4) == bytes(4)
    rig.negotiate()
    rig.function.bar_write(VIRTIO_BAR, DEVICE_OFFSET + 32, b"\0")  # writeback off
    assert not device.writeback
    rig.function.bar_write(VIRTIO_BAR, DEVICE_OFFSET, b"\0" * 8)  # refused, logged
    assert rig.function.bar_read(VIRTIO_BAR, DEVICE_OFFSET, 8) == data
    device.close()


async def test_pci_configuration_access_capability(make_rig: object) -> None:
    """4.1.4.9: BAR accesses through a window in config space."""
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    config = rig.function.config
    cap = rig.function.pci_cfg_cap
    config.write(cap + 4, bytes([VIRTIO_BAR]))
    config.write(cap + 8, struct.pack("<II", COMMON_OFFSET + 18, 2))  # num_queues
    assert config.read(cap + 16, 2) == b"\1\0"
    config.write(cap + 8, struct.pack("<II", COMMON_OFFSET + 20, 1))  # device_status
    config.write(cap + 16, bytes([A]))
    assert rig.read("device_status") == A
    config.write(cap + 8, struct.pack("<II", COMMON_OFFSET + 21, 2))  # misaligned: refused
    config.write(cap + 16, b"\0\0")
    assert rig.read("device_status") == A


async def test_dumping_config_space_does_not_read_through_the_window(make_rig: object) -> None:
    device = RngDevice()
    rig: Rig = make_rig(device)  # type: ignore[operator]
    device.config_changed()
    cap = rig.function.pci_cfg_cap
    rig.function.config.write(cap + 4, bytes([VIRTIO_BAR]))
    rig.function.config.write(cap + 8, struct.pack("<II", ISR_OFFSET, 1))
    rig.function.config.read(0, 256)  # a whole dump: no side effect on the ISR
    assert rig.function.isr == 2


async def test_reset_withdraws_pending_vectors(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.negotiate()
    rig.add_queue(0)
    rig.write("config_msix_vector", 0)
    msix = rig.function.msix
    msix.trigger(1)  # MSI-X disabled: both pending
    msix.trigger(0)
    assert msix.read_pba(0, 1) == b"\3"
    rig.write("device_status", 0)
    assert msix.read_pba(0, 1) == b"\0"
    rig.enable_msix()
    assert sum(fired(fd) for fd in rig.vectors) == 0


async def test_function_reset_resets_pci_state_too(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.enable_msix()
    rig.function.config.write(0x04, b"\x06\x00")
    rig.negotiate()
    rig.function.reset()
    assert rig.read("device_status") == 0
    assert rig.function.config.read(0x04, 2) == b"\0\0"
    assert not rig.function.msix.enabled


async def test_rings_unmapped_stop_the_queue_until_mapped_again(make_rig: object) -> None:
    rig: Rig = make_rig(RngDevice())  # type: ignore[operator]
    rig.enable_msix()
    rig.negotiate()
    q = rig.add_queue(0)
    rig.write("device_status", A | D | FOK | DOK)
    await trio.testing.wait_all_tasks_blocked()
    memory = rig.function.memory
    (region,) = list(memory)
    memory.remove(region.gpa, region.size, region.uva)
    rig.function.memory_changed()
    assert not rig.function.runtime.runners[0].running
    await run_rng_request(rig, q)
    assert q.collect() == []
    memory.add(region)
    rig.function.memory_changed()
    await trio.testing.wait_all_tasks_blocked()
    assert len(q.collect()) == 1
