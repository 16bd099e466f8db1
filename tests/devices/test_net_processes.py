"""virtio-net with a process per queue pair (``--queue-processes``)."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from outboard.devices.net import (
    CtrlAck,
    CtrlClass,
    CtrlMq,
    CtrlRx,
    Generator,
    Loopback,
    NetDevice,
    Port,
    udp_frame,
)
from tests.backend.test_workers import children
from tests.devices.test_net import MAC_A, MAC_B, Nic, frame, header, serve

pytestmark = pytest.mark.usefixtures("fd_leak_check")


@asynccontextmanager
async def nic(tmp_path: Path, port: Port, pairs: int) -> AsyncIterator[Nic]:
    device = NetDevice(port, mac=MAC_A, queue_pairs=pairs, config_space=True)
    device.queue_processes = True
    async with serve(tmp_path, [device]) as (n,):
        yield n


def pair_processes() -> list[int]:
    return children(os.getpid())


async def test_each_pair_loops_back_in_a_process_of_its_own(tmp_path: Path) -> None:
    async with nic(tmp_path, Loopback(), 2) as n:
        assert await n.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET,
                               struct.pack("<H", 2)) == CtrlAck.OK
        workers = pair_processes()
        assert len(workers) == 2  # the control queue stays in this process
        sent = {pair: [header() + frame(MAC_A, MAC_B, 60 + 200 * i + pair, seed=i)
                       for i in range(5)] for pair in (0, 1)}
        for pair in (0, 1):
            n.post(8, pair=pair)
            for packet in sent[pair]:
                n.send(packet, pair=pair)
        for pair in (0, 1):
            await n.sent(5, pair=pair)
            got = await n.receive(5, pair=pair)
            assert [r.frame for r in got] == [p[len(header()):] for p in sent[pair]]
        await n.driver.stop()
        assert pair_processes() == []
        # What the pair processes counted arrived when they stopped.
        assert (n.device.stats.tx_packets, n.device.stats.rx_packets) == (10, 10)


async def test_a_connection_that_ends_stops_each_pair_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outboard.workers")
    async with nic(tmp_path, Loopback(), 2):
        forks = len([r for r in caplog.records if "served by process" in r.message])
        assert len(pair_processes()) == 2
    # Not a new process for the queue left each time one of the pair stops.
    assert len([r for r in caplog.records if "served by process" in r.message]) == forks
    assert pair_processes() == []


async def test_a_control_command_restarts_the_pairs_with_the_new_settings(
        tmp_path: Path) -> None:
    async with nic(tmp_path, Loopback(), 2) as n:
        before = set(pair_processes())
        # Promiscuous off, and a frame for someone else: the filter, set in this
        # process by the control queue, must hold in the pair's process.
        assert await n.command(CtrlClass.RX, CtrlRx.PROMISC, b"\x00") == CtrlAck.OK
        after = set(pair_processes())
        assert len(after) == 2 and not before & after
        n.post(4)
        n.send(header() + frame(MAC_B, MAC_A, seed=1))  # not for us: filtered
        n.send(header() + frame(MAC_A, MAC_B, seed=2))  # for us
        await n.sent(2)
        (got,) = await n.receive()
        assert got.frame == frame(MAC_A, MAC_B, seed=2)
        await n.driver.stop()
        assert n.device.stats.rx_filtered == 1


async def test_a_generator_fills_from_the_pair_process(tmp_path: Path) -> None:
    async with nic(tmp_path, Generator(64), 1) as n:
        n.post(10)
        got = await n.receive(10)
        assert all(r.frame == udp_frame(64) for r in got)
        assert len(pair_processes()) == 1


@pytest.mark.parametrize("option", ["--switch", "--capture"])
def test_queue_processes_refuse_shared_ports(tmp_path: Path, option: str) -> None:
    port = ["--switch", "sw0"] if option == "--switch" else [
        "--loopback", "--capture", str(tmp_path / "c.pcap")]
    result = subprocess.run([sys.executable, "-m", "outboard", "net", *port, "--socket-path",
                             str(tmp_path / "s"), "--queue-processes"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"--queue-processes does not go with {option}" in result.stderr
