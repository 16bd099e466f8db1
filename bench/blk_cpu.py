"""The block back-end's CPU per request, in-process: no socket, no wake-ups.

    python -m bench.blk_cpu                 # 4 KiB random reads, best of 5
    python -m bench.blk_cpu --write --profile

A ``BlkDevice`` and a ``SplitQueue`` over guest RAM in this process; each round
offers ``--depth`` requests the way Linux lays them out (an indirect table of
header, data and status), then times ``process`` and ``publish`` until the ring
is empty. What is left is the device's own cost per request: the descriptor
walk, the ``preadv``/``pwritev`` and the completion. ``--profile`` shows where
it goes (cProfile, which inflates Python-level time several times).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import struct
import sys
import tempfile
from collections.abc import Sequence

from bench.cpu import serve_all
from outboard.backend import Feature, SplitQueue, bit
from outboard.devices.blk import BlkDevice
from outboard.testing import Buffer, DriverQueue, GuestRam

IMAGE_SIZE = 256 << 20
BLOCK = 4096


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="4 KiB random writes")
    p.add_argument("--depth", type=int, default=128, help="requests per round (128)")
    p.add_argument("--block", type=int, default=BLOCK, help="bytes per request (4096)")
    p.add_argument("--segments", type=int, default=1,
                   help="data buffers per request, as a guest's scattered pages (1)")
    p.add_argument("--rounds", type=int, default=100, help="rounds per measurement (100)")
    p.add_argument("--profile", action="store_true", help="then profile one measurement")
    p.add_argument("--image-dir", default="/dev/shm")
    args = p.parse_args(argv)
    kind = 1 if args.write else 0
    with tempfile.NamedTemporaryFile(dir=args.image_dir, prefix="outboard-cpu-") as f:
        f.write(os.urandom(IMAGE_SIZE))
        f.flush()
        device = BlkDevice(f.name)
        device.activate(device.features | bit(Feature.VERSION_1) | bit(9))  # FLUSH: write back
        block = args.block
        seg = block // args.segments
        ram = GuestRam((32 << 20) + args.depth * 2 * block)
        driver = DriverQueue(ram, 256, event_idx=True)
        queue = SplitQueue(0, 256)
        queue.set_features(event_idx=True, indirect=True)
        queue.setup(ram.memory(), driver.desc_gpa, driver.avail_gpa, driver.used_gpa)
        slots = [(ram.alloc(16), ram.alloc(block, 4096), ram.alloc(1))
                 for _ in range(args.depth)]
        headers = [ram.view(h, 16) for h, _, _ in slots]
        rng = random.Random(1)
        blocks = IMAGE_SIZE // block

        def measure(profile: cProfile.Profile | None = None) -> float:
            spent = 0.0
            for _ in range(args.rounds):
                for header, (h, d, s) in zip(headers, slots, strict=True):
                    struct.pack_into("<IIQ", header, 0, kind, 0,
                                     rng.randrange(blocks) * (block // 512))
                    data = [Buffer(d + i * seg, seg, writable=kind == 0)
                            for i in range(args.segments)]
                    driver.offer([Buffer(h, 16), *data, Buffer(s, 1, writable=True)],
                                 indirect=True)
                driver.publish()
                spent += serve_all(device, queue, driver, profile)
                done = driver.collect()
                if len(done) != args.depth or any(ram.read(s, 1) != b"\0" for _, _, s in slots):
                    raise SystemExit("a request failed")
            return spent / (args.rounds * args.depth) * 1e6

        measure()
        best = min(measure() for _ in range(5))
        print(f"{'write' if kind else 'read'} {block // 1024} KiB in {args.segments} "
              f"buffer(s), {args.depth} per round: "
              f"{best:.2f} us of CPU per request (best of 5), "
              f"{1e6 / best:,.0f} requests/s on one core")
        if args.profile:
            profile = cProfile.Profile()
            measure(profile)
            pstats.Stats(profile).sort_stats("tottime").print_stats(8)
        device.close()
        ram.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
