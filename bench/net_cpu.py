"""The net back-end's CPU per frame, in-process: no socket, no wake-ups.

    python -m bench.net_cpu                 # loopback of 64 B frames, best of 5
    python -m bench.net_cpu --size 1518 --profile

A ``NetDevice`` with the loopback port and its split rings over guest RAM in
this process, laid out as DPDK's virtio-user does (one descriptor per packet,
the virtio-net header in front of the frame, descriptor i in slot i of the
available ring; receive buffers of 2 KiB; ``--shuffled``: descriptors in any
order, as from a free list). Each
round offers ``--depth`` packets to transmit and as many receive buffers, then
times ``process`` on the transmit queue (which loops every frame into the
receive ring) and the publishing of both rings. What is left is the device's
own cost per frame forwarded: the transmit walk, the copy into a receive
buffer and both used entries. Every frame received is checked against the one
sent. ``--profile`` shows where it goes (cProfile, which inflates Python-level
time several times).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from collections.abc import Sequence

from bench.cpu import serve_all
from outboard.backend import Feature, SplitQueue, bit
from outboard.backend.virtqueue.split import VIRTQ_DESC_F_WRITE
from outboard.devices.net import Loopback, NetDevice, NetFeature, udp_frame
from outboard.devices.net.wire import HEADER_SIZE
from outboard.testing import Buffer, DriverQueue, GuestRam

RX_BUFFER = 2048
QUEUE_SIZE = 1024


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="frame size in bytes (64)")
    p.add_argument("--depth", type=int, default=1024, help="frames per round (1024)")
    p.add_argument("--rounds", type=int, default=50, help="rounds per measurement (50)")
    p.add_argument("--shuffled", action="store_true",
                   help="descriptors in the order a free list gives them, not slot i = "
                        "descriptor i")
    p.add_argument("--profile", action="store_true", help="then profile one measurement")
    args = p.parse_args(argv)
    depth = args.depth
    packet = bytes(HEADER_SIZE) + udp_frame(args.size)
    ram = GuestRam((8 << 20) + depth * (RX_BUFFER + 2 * len(packet)))
    device = NetDevice(Loopback(), queue_size=QUEUE_SIZE)
    drivers = [DriverQueue(ram, QUEUE_SIZE) for _ in range(2)]
    queues = [SplitQueue(i, QUEUE_SIZE) for i in range(3)]
    for queue, driver in zip(queues, drivers, strict=False):
        queue.set_features(event_idx=False, indirect=False)
        queue.setup(ram.memory(), driver.desc_gpa, driver.avail_gpa, driver.used_gpa)
        queue.notifier = lambda: None
    device.bind(queues)
    device.activate(device.features & (bit(Feature.VERSION_1) | bit(NetFeature.MRG_RXBUF)
                                       | bit(NetFeature.CSUM) | bit(NetFeature.GUEST_CSUM)))
    rx_driver, tx_driver = drivers
    rx_queue, tx_queue = queues[0], queues[1]
    tx_slots = [ram.alloc(len(packet), 64) for _ in range(depth)]
    for gpa in tx_slots:
        ram.write(gpa, packet)
    rx_slots = [ram.alloc(RX_BUFFER, 64) for _ in range(depth)]
    rx_at = dict.fromkeys(range(QUEUE_SIZE), 0)

    def offer(driver: DriverQueue, gpa: int, size: int, flags: int) -> int:
        if args.shuffled:
            return driver.offer([Buffer(gpa, size, writable=bool(flags))])
        # As DPDK does: descriptor i always in slot i of the available ring.
        head = driver.avail_idx % QUEUE_SIZE
        driver.write_desc(head, gpa, size, flags, 0)
        driver.make_available(head)
        return head

    def measure(profile: cProfile.Profile | None = None) -> float:
        spent = 0.0
        for _ in range(args.rounds):
            for gpa in rx_slots:
                rx_at[offer(rx_driver, gpa, RX_BUFFER, VIRTQ_DESC_F_WRITE)] = gpa
            rx_driver.publish()
            for gpa in tx_slots:
                offer(tx_driver, gpa, len(packet), 0)
            tx_driver.publish()
            spent += serve_all(device, tx_queue, tx_driver, profile)
            received = rx_driver.collect()
            if len(tx_driver.collect()) != depth or len(received) != depth:
                raise SystemExit("a frame was lost")
            for used in received:
                got = ram.read(rx_at[used.head], used.written)
                if used.written != len(packet) or got[HEADER_SIZE:] != packet[HEADER_SIZE:]:
                    raise SystemExit("a frame arrived changed")
        return spent / (args.rounds * depth) * 1e6

    measure()
    best = min(measure() for _ in range(5))
    print(f"loopback of {args.size} B frames, {depth} per round: {best:.3f} us of CPU "
          f"per frame (best of 5), {1 / best:.3f} Mpps on one core")
    if args.profile:
        profile = cProfile.Profile()
        measure(profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(10)
    assert rx_queue.used_idx == tx_queue.used_idx
    ram.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
