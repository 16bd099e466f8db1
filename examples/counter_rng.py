"""A complete virtio device in a few lines: an "rng" that serves a byte counter.

Run it, then attach QEMU (``-device vhost-user-rng-pci``) or read it with
``examples/read_rng.py``::

    python examples/counter_rng.py /tmp/counter.sock
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from outboard.backend import QueueSpec, SplitQueue, VirtioDevice, VirtioDeviceId
from outboard.cli import setup_logging
from outboard.transports.vhost_user import serve_path


class CounterRng(VirtioDevice):
    device_id = VirtioDeviceId.RNG
    queues: Sequence[QueueSpec] = (QueueSpec("requestq", 256),)

    def __init__(self) -> None:
        super().__init__()
        self.next = 0

    def process(self, queue: SplitQueue) -> None:
        for chain in queue:
            data = bytes((self.next + i) & 0xFF for i in range(chain.writable_size))
            self.next = (self.next + len(data)) & 0xFF
            queue.push(chain, chain.write(data))


if __name__ == "__main__":
    setup_logging(0)
    trio.run(serve_path, CounterRng(), sys.argv[1] if len(sys.argv) > 1 else "/tmp/counter.sock")
