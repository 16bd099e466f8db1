"""What the in-process benchmarks (``bench.blk_cpu``, ``bench.net_cpu``) share."""

from __future__ import annotations

import cProfile
import time

from outboard.backend import SplitQueue, VirtioDevice
from outboard.testing import DriverQueue

__all__ = ["serve_all"]


def serve_all(device: VirtioDevice, queue: SplitQueue, driver: DriverQueue,
              profile: cProfile.Profile | None = None) -> float:
    """Seconds the device spends in ``process`` and ``publish`` (as the runtime
    calls them) until ``queue`` has taken everything ``driver`` offered;
    profiled when ``profile`` is given."""
    if profile is not None:
        profile.enable()
    start = time.perf_counter()
    while queue.last_avail_idx != driver.avail_idx:
        device.process(queue)
        queue.publish()
    spent = time.perf_counter() - start
    if profile is not None:
        profile.disable()
    return spent
