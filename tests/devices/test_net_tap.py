"""virtio-net on a host tap, seen from a packet socket on the tap's interface.

Needs CAP_NET_ADMIN and /dev/net/tun (root in CI). Frames carry a local
experimental ethertype and the interface has no addresses (IPv6 is turned off
on it), so nothing but the test's own frames crosses it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from outboard.devices.net import NetDevice, NetFeature, Tap
from outboard.devices.net.tap import offload_flags

from .test_net import ETHERTYPE, MAC_A, MAC_B, Nic, frame, header, serve

pytestmark = pytest.mark.usefixtures("fd_leak_check")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def _tap_problem() -> str | None:
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    try:
        Tap(f"obprobe{os.getpid() % 10000}").close()
    except OSError as exc:
        return f"cannot create a tap: {exc}"
    return None


@pytest.fixture(scope="module")
def tap_usable() -> None:
    problem = _tap_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"tap tests cannot run under CI: {problem}")
        pytest.skip(f"tap tests need root and /dev/net/tun: {problem}")


_serial = iter(range(1000))


@asynccontextmanager
async def tap_nic(tmp_path: Path, *, queue_pairs: int = 1,
                  features: int | None = None) -> AsyncIterator[tuple[Nic, trio.socket.SocketType]]:
    name = f"obt{os.getpid() % 10000}x{next(_serial)}"
    device = NetDevice(Tap(name, queue_pairs), mac=MAC_A, queue_pairs=queue_pairs)
    try:
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        sniffer = trio.socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with sniffer:
            await sniffer.bind((name, 0))
            async with serve(tmp_path, [device], features=features) as (nic,):
                yield nic, sniffer
    finally:
        device.close()


async def _incoming(sniffer: trio.socket.SocketType) -> bytes:
    """The next frame the interface received (from the device) with our ethertype."""
    with trio.fail_after(10):
        while True:
            data, address = await sniffer.recvfrom(70000)
            if address[2] != PACKET_OUTGOING and data[12:14] == ETHERTYPE:
                return data


async def test_driver_frames_reach_the_tap(tmp_path: Path, tap_usable: None) -> None:
    async with tap_nic(tmp_path) as (nic, sniffer):
        for size in (60, 1514):
            sent = frame(MAC_B, MAC_A, size, seed=size)
            nic.send(header() + sent)
            await nic.sent()
            assert await _incoming(sniffer) == sent
        assert nic.device.stats.tx_packets == 2


async def test_tap_frames_reach_the_driver(tmp_path: Path, tap_usable: None) -> None:
    async with tap_nic(tmp_path) as (nic, sniffer):
        nic.post(8)
        sent = [frame(MAC_A, MAC_B, size, seed=size) for size in (60, 1000, 1514)]
        for f in sent:
            await sniffer.send(f)
        got = await nic.receive(3)
        assert [r.frame for r in got] == sent
        assert all(r.header == header(num_buffers=1) for r in got)
        assert nic.device.stats.rx_packets == 3


async def test_tap_frame_spans_small_buffers(tmp_path: Path, tap_usable: None) -> None:
    async with tap_nic(tmp_path) as (nic, sniffer):
        nic.post(8, 256)
        sent = frame(MAC_A, MAC_B, 1000)
        await sniffer.send(sent)
        (got,) = await nic.receive()
        assert got.buffers == 4 and got.frame == sent


async def test_tap_waits_for_buffers(tmp_path: Path, tap_usable: None) -> None:
    async with tap_nic(tmp_path) as (nic, sniffer):
        sent = frame(MAC_A, MAC_B, seed=7)
        await sniffer.send(sent)
        await trio.sleep(0.2)
        assert nic.nothing_received()
        nic.post(1)
        (got,) = await nic.receive()
        assert got.frame == sent
        assert nic.device.stats.rx_ring_full == 0


async def test_tap_with_two_queue_pairs(tmp_path: Path, tap_usable: None) -> None:
    async with tap_nic(tmp_path, queue_pairs=2) as (nic, sniffer):
        for pair in (0, 1):
            nic.post(4, pair=pair)
            sent = frame(MAC_B, MAC_A, seed=pair)
            nic.send(header() + sent, pair=pair)
            await nic.sent(pair=pair)
            assert await _incoming(sniffer) == sent
        await sniffer.send(frame(MAC_A, MAC_B, seed=9))
        with trio.fail_after(10):
            while nic.device.stats.rx_packets == 0:
                await trio.sleep(0.01)


def test_tap_offers_offloads_the_kernel_takes(tap_usable: None) -> None:
    tap = Tap(f"obo{os.getpid() % 10000}")
    try:
        for feature in (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.HOST_TSO4,
                        NetFeature.HOST_TSO6, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6):
            assert tap.features >> feature & 1, feature.name
    finally:
        tap.close()


def test_offload_flags_follow_guest_features() -> None:
    guest = 1 << NetFeature.GUEST_CSUM | 1 << NetFeature.GUEST_TSO4 | 1 << NetFeature.GUEST_UFO
    assert offload_flags(guest) == 0x01 | 0x02 | 0x10
    assert offload_flags(1 << NetFeature.GUEST_TSO4) == 0  # nothing without partial checksums
