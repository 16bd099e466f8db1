"""Read bytes from any vhost-user rng back-end, no VM needed::

    python examples/read_rng.py /tmp/rng.sock 32
"""

from __future__ import annotations

import sys

import trio

from outboard.testing import Buffer, open_device


async def read(path: str, size: int) -> bytes:
    async with open_device(path, [64]) as driver:
        buf = driver.ram.alloc(size)
        driver.offer(0, [Buffer(buf, size, writable=True)])
        driver.kick(0)
        (used,) = await driver.wait_used(0)
        return driver.ram.read(buf, used.written)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/rng.sock"
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    print(trio.run(read, path, size).hex())
