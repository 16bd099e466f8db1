"""PCI configuration space: the header, write masks, BAR sizing, the capability list."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import pytest
import trio

from outboard.backend import DeviceState
from outboard.backend.memory import GuestMemory
from outboard.backend.pci.capabilities import (
    EXPRESS_CAP_SIZE,
    add_express,
    add_msix,
    add_power_management,
)
from outboard.backend.pci.config import (
    BarKind,
    CapabilityId,
    Command,
    ConfigSpace,
    Status,
)
from outboard.backend.pci.function import Bar, PciFunction
from outboard.backend.pci.msix import Msix
from outboard.backend.pci.virtio_pci import (
    MSIX_BAR,
    VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
    CfgType,
    VirtioPciFunction,
)
from outboard.backend.runtime import Runtime
from outboard.devices.blk import BlkDevice
from outboard.devices.rng import RngDevice

pytestmark = pytest.mark.usefixtures("fd_leak_check")


def header() -> ConfigSpace:
    config = ConfigSpace()
    config.type0_header(vendor_id=0x1AF4, device_id=0x1044, revision=1, class_code=0xFF0000,
                        subsystem_vendor_id=0x1AF4, subsystem_id=0x44)
    return config


def u16(config: ConfigSpace, offset: int) -> int:
    return int.from_bytes(config.read(offset, 2), "little")


def u32(config: ConfigSpace, offset: int) -> int:
    return int.from_bytes(config.read(offset, 4), "little")


# -- the header ----------------------------------------------------------------------


def test_type0_header_fields() -> None:
    config = header()
    vendor, device = struct.unpack("<HH", config.read(0, 4))
    assert (vendor, device) == (0x1AF4, 0x1044)
    assert config.read(0x08, 4) == bytes([1, 0x00, 0x00, 0xFF])  # revision, class
    assert config.read(0x0E, 1) == b"\0"  # header type 0, single function
    assert struct.unpack("<HH", config.read(0x2C, 4)) == (0x1AF4, 0x44)
    assert config.read(0x3D, 1) == b"\1"  # INTA#
    assert config.read(0x34, 1) == b"\0"  # no capabilities yet
    assert not u16(config, 0x06) & Status.CAPABILITY_LIST


def test_read_only_bytes_ignore_writes() -> None:
    config = header()
    config.write(0, b"\xff\xff\xff\xff")
    config.write(0x08, b"\xff\xff\xff\xff")
    config.write(0x2C, b"\0\0\0\0")
    assert struct.unpack("<HH", config.read(0, 4)) == (0x1AF4, 0x1044)
    assert config.read(0x08, 4) == bytes([1, 0x00, 0x00, 0xFF])
    assert struct.unpack("<HH", config.read(0x2C, 4)) == (0x1AF4, 0x44)


def test_command_register_takes_only_its_writable_bits() -> None:
    config = header()
    config.write(0x04, b"\xff\xff")
    assert u16(config, 0x04) == (Command.MEMORY_SPACE | Command.BUS_MASTER
                                 | Command.PARITY_ERROR_RESPONSE | Command.SERR
                                 | Command.INTX_DISABLE)
    config.write(0x04, b"\0\0")
    assert u16(config, 0x04) == 0


def test_status_error_bits_are_write_one_to_clear() -> None:
    config = header()
    config.put(0x06, 2, Status.RECEIVED_MASTER_ABORT | Status.DETECTED_PARITY_ERROR
               | Status.CAPABILITY_LIST)
    config.write(0x06, (0).to_bytes(2, "little"))  # writing 0 keeps them
    assert u16(config, 0x06) & Status.RECEIVED_MASTER_ABORT
    config.write(0x06, int(Status.RECEIVED_MASTER_ABORT).to_bytes(2, "little"))
    assert u16(config, 0x06) == Status.DETECTED_PARITY_ERROR | Status.CAPABILITY_LIST
    config.write(0x06, b"\xff\xff")  # the read-only capability bit survives all-ones
    assert u16(config, 0x06) == Status.CAPABILITY_LIST


def test_cache_line_size_and_interrupt_line_are_writable() -> None:
    config = header()
    config.write(0x0C, b"\x10")
    config.write(0x3C, b"\x0b")
    assert config.read(0x0C, 1) == b"\x10"
    assert config.read(0x3C, 2) == b"\x0b\x01"  # the pin stays


def test_access_outside_the_space_is_refused() -> None:
    config = header()
    with pytest.raises(ValueError):
        config.read(4095, 2)
    with pytest.raises(ValueError):
        config.write(4096, b"\0")


def test_reset_restores_the_sealed_values() -> None:
    config = header()
    config.seal()
    config.write(0x04, b"\x06\x00")
    config.write(0x3C, b"\x0b")
    config.reset()
    assert u16(config, 0x04) == 0
    assert config.read(0x3C, 1) == b"\0"


# -- BARs ----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "flags"), [(0x10, 0), (0x1000, 0), (0x4000, 0),
                                             (1 << 31, 0)])
def test_32_bit_bar_sizing(size: int, flags: int) -> None:
    """Write all-ones, read back the size mask (PCI 3.0, 6.2.5.1)."""
    config = header()
    config.bar(2, size)
    config.write(0x18, b"\xff\xff\xff\xff")
    assert u32(config, 0x18) == (~(size - 1) & 0xFFFF_FFFF) | flags
    config.write(0x18, (0xFEBC_1234).to_bytes(4, "little"))
    assert u32(config, 0x18) == 0xFEBC_1234 & ~(size - 1) & 0xFFFF_FFF0


def test_64_bit_bar_sizing_covers_both_halves() -> None:
    config = header()
    config.bar(4, 0x4000, BarKind.MEMORY64, prefetchable=True)
    assert u32(config, 0x20) & 0xF == 0b1100  # 64-bit, prefetchable
    config.write(0x20, b"\xff" * 8)
    assert u32(config, 0x20) == 0xFFFF_C000 | 0b1100
    assert u32(config, 0x24) == 0xFFFF_FFFF
    config.write(0x20, (0x12_3456_8000).to_bytes(8, "little"))
    assert int.from_bytes(config.read(0x20, 8), "little") == 0x12_3456_8000 | 0b1100


def test_io_bar_sizing_and_the_io_space_bit() -> None:
    config = header()
    config.bar(0, 0x20, BarKind.IO)
    config.write(0x10, b"\xff" * 4)
    assert u32(config, 0x10) == 0xFFFF_FFE1
    config.write(0x04, b"\x01\x00")
    assert u16(config, 0x04) & Command.IO_SPACE


def test_unimplemented_bar_reads_zero_after_all_ones() -> None:
    config = header()
    config.write(0x14, b"\xff" * 4)
    assert u32(config, 0x14) == 0


@pytest.mark.parametrize(("size", "kind"), [
    (0x3000, BarKind.MEMORY32), (0x1800, BarKind.MEMORY64), (8, BarKind.MEMORY32),
    (0, BarKind.MEMORY32), (2, BarKind.IO), (0x200, BarKind.IO), (1 << 32, BarKind.MEMORY32),
])
def test_bar_size_must_be_a_power_of_two_in_range(size: int, kind: BarKind) -> None:
    with pytest.raises(ValueError):
        header().bar(0, size, kind)


def test_64_bit_bar_cannot_start_at_the_last_slot() -> None:
    with pytest.raises(ValueError):
        header().bar(5, 0x1000, BarKind.MEMORY64)


# -- capabilities ----------------------------------------------------------------------


def test_capability_list_links_dword_aligned_entries() -> None:
    config = header()
    first = config.add_capability(0x09, b"\x03\x01")  # 4 bytes in all
    second = config.add_capability(0x09, b"\x05")       # 3 bytes, next one aligned up
    third = config.add_capability(0x01, bytes(6))
    assert (first, second, third) == (0x40, 0x44, 0x48)
    assert config.read(0x34, 1) == b"\x40"
    assert u16(config, 0x06) & Status.CAPABILITY_LIST
    assert config.capabilities() == [(0x09, 0x40), (0x09, 0x44), (0x01, 0x48)]
    assert config.read(0x48 + 1, 1) == b"\0"  # the list ends


def test_capability_list_must_fit_the_first_256_bytes() -> None:
    config = header()
    for _ in range(6):
        config.add_capability(0x09, bytes(30))
    with pytest.raises(ValueError):
        config.add_capability(0x09, bytes(30))


def test_capability_mask_must_cover_the_body() -> None:
    with pytest.raises(ValueError):
        header().add_capability(0x09, bytes(4), wmask=bytes(3))


def test_hooks_see_the_access_range() -> None:
    config = header()
    seen: list[tuple[str, int, int]] = []
    config.on_read(0x40, 4, lambda o, s: seen.append(("read", o, s)))
    config.on_write(0x40, 4, lambda o, s: seen.append(("write", o, s)))
    config.read(0x3E, 4)
    config.write(0x43, b"\0\0")
    config.read(0x50, 4)  # no overlap
    assert seen == [("read", 0x3E, 4), ("write", 0x43, 2)]


def test_power_management_capability() -> None:
    config = header()
    pm = add_power_management(config)
    pmc, pmcsr = struct.unpack("<HH", config.read(pm + 2, 4))
    assert pmc & 7 == 3
    assert pmcsr == 1 << 3  # D0, No_Soft_Reset
    config.write(pm + 4, b"\xff\xff")
    assert u16(config, pm + 4) == 3 | 1 << 3  # only the power state took


def test_express_capability() -> None:
    config = header()
    cap = add_express(config)
    assert config.read(cap, 1) == bytes([CapabilityId.EXPRESS])
    assert u16(config, cap + 2) == 2  # version 2, endpoint
    assert u16(config, cap + 0x12) == 0x11  # link up at 2.5 GT/s x1
    config.put(cap + 0x0A, 2, 0x5)
    config.write(cap + 0x0A, b"\x01\x00")
    assert u16(config, cap + 0x0A) == 0x4  # W1C
    assert cap + EXPRESS_CAP_SIZE <= 0x100


def test_msix_capability_reflects_and_drives_the_msix_state() -> None:
    config = header()
    msix = Msix(5)
    cap = add_msix(config, msix, table_bar=1, table_offset=0, pba_bar=1, pba_offset=0x1000)
    control, table, pba = struct.unpack("<HII", config.read(cap + 2, 10))
    assert control == 4  # table size N-1, disabled, unmasked
    assert (table, pba) == (1, 0x1000 | 1)
    config.write(cap + 2, (0xC000 | 0x7FF).to_bytes(2, "little"))
    assert msix.enabled and msix.function_masked
    assert u16(config, cap + 2) == 0xC004  # the table size is read-only
    msix.reset()
    assert u16(config, cap + 2) == 4


def test_msix_capability_needs_qword_aligned_offsets() -> None:
    with pytest.raises(ValueError):
        add_msix(header(), Msix(1), table_bar=1, table_offset=4, pba_bar=1, pba_offset=0x800)


def test_intx_disable_and_interrupt_status() -> None:
    config = header()
    function = PciFunction(config, [Bar(0, 0x1000)])
    config.seal()
    function.intx.set_level(True)
    assert u16(config, 0x06) & Status.INTERRUPT
    config.write(0x04, int(Command.INTX_DISABLE).to_bytes(2, "little"))
    assert function.intx.disabled
    assert not function.intx.asserted
    assert u16(config, 0x06) & Status.INTERRUPT  # the status shows the level regardless
    function.intx.set_level(False)
    assert not u16(config, 0x06) & Status.INTERRUPT
    function.close()


# -- the virtio-pci function's config space ---------------------------------------------


@pytest.fixture
async def runtime_for() -> AsyncIterator[object]:
    made: list[VirtioPciFunction] = []
    async with trio.open_nursery() as nursery:
        def make(device: object) -> VirtioPciFunction:
            state = DeviceState(device)  # type: ignore[arg-type]
            function = VirtioPciFunction(state, Runtime(state, nursery), GuestMemory())
            made.append(function)
            return function
        yield make
        for function in made:
            function.close()


@pytest.mark.parametrize(("make", "virtio_id", "class_code"), [
    (lambda p: RngDevice(), 4, 0xFF0000),
    (lambda p: BlkDevice(str(p)), 2, 0x010000),
])
async def test_virtio_header(runtime_for: object, tmp_path: object, make: object,
                             virtio_id: int, class_code: int) -> None:
    image = tmp_path / "img"  # type: ignore[operator]
    image.write_bytes(bytes(1 << 20))
    device = make(image)  # type: ignore[operator]
    function: VirtioPciFunction = runtime_for(device)  # type: ignore[operator]
    config = function.config
    assert struct.unpack("<HH", config.read(0, 4)) == (0x1AF4, 0x1040 + virtio_id)
    assert config.read(0x08, 1) == b"\1"  # revision 1: non-transitional
    assert int.from_bytes(config.read(0x09, 3), "little") == class_code
    assert struct.unpack("<HH", config.read(0x2C, 4)) == (0x1AF4, 0x40 + virtio_id)
    device.close()


async def test_virtio_bars_are_powers_of_two(runtime_for: object) -> None:
    function: VirtioPciFunction = runtime_for(RngDevice())  # type: ignore[operator]
    for bar in function.bars.values():
        assert bar.size & (bar.size - 1) == 0
    assert function.bar_size(VIRTIO_BAR) == VIRTIO_BAR_SIZE
    assert function.bars[VIRTIO_BAR].kind is BarKind.MEMORY64
    assert function.bar_size(VIRTIO_BAR + 1) == 0
    config = function.config
    config.write(0x10 + 4 * VIRTIO_BAR, b"\xff" * 8)
    assert int.from_bytes(config.read(0x10 + 4 * VIRTIO_BAR, 8), "little") == \
        (~(VIRTIO_BAR_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFF0) | 0b100


async def test_virtio_capability_list(runtime_for: object, tmp_path: object) -> None:
    image = tmp_path / "img"  # type: ignore[operator]
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(str(image), num_queues=3)
    function: VirtioPciFunction = runtime_for(device)  # type: ignore[operator]
    config = function.config
    ids = [cap_id for cap_id, _ in config.capabilities()]
    assert ids[:3] == [CapabilityId.MSIX, CapabilityId.POWER_MANAGEMENT, CapabilityId.EXPRESS]
    virtio = {}
    for cap_id, offset in config.capabilities():
        assert offset % 4 == 0 and offset >= 0x40
        if cap_id == CapabilityId.VENDOR_SPECIFIC:
            cap_len, cfg_type, bar = config.read(offset + 2, 3)
            at, length = struct.unpack("<II", config.read(offset + 8, 8))
            virtio[cfg_type] = (cap_len, bar, at, length, offset)
    assert set(virtio) == {CfgType.COMMON_CFG, CfgType.NOTIFY_CFG, CfgType.ISR_CFG,
                           CfgType.DEVICE_CFG, CfgType.PCI_CFG}
    for cfg_type in (CfgType.COMMON_CFG, CfgType.ISR_CFG, CfgType.DEVICE_CFG):
        cap_len, bar, at, length, _ = virtio[cfg_type]
        assert (cap_len, bar) == (16, VIRTIO_BAR)
        assert at + length <= VIRTIO_BAR_SIZE
    assert virtio[CfgType.DEVICE_CFG][3] == len(device.config())
    cap_len, bar, at, length, offset = virtio[CfgType.NOTIFY_CFG]
    assert cap_len == 20
    multiplier = int.from_bytes(config.read(offset + 16, 4), "little")
    assert multiplier == 4 and length == 3 * multiplier
    msix_cap = dict(config.capabilities())[CapabilityId.MSIX]
    assert int.from_bytes(config.read(msix_cap + 4, 4), "little") & 7 == MSIX_BAR
    assert u16(config, msix_cap + 2) & 0x7FF == 3  # one vector per queue and one for config
    device.close()


async def test_device_without_config_has_no_device_capability(runtime_for: object) -> None:
    function: VirtioPciFunction = runtime_for(RngDevice())  # type: ignore[operator]
    types = [function.config.read(offset + 3, 1)[0] for cap_id, offset
             in function.config.capabilities() if cap_id == CapabilityId.VENDOR_SPECIFIC]
    assert CfgType.DEVICE_CFG not in types
