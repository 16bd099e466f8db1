"""The queue worker's share of the event loop."""

from __future__ import annotations

import itertools

import pytest

from outboard.backend import SplitQueue, VirtioDevice, runtime
from outboard.backend.device import DeviceState, QueueSpec
from outboard.testing import Buffer, DriverQueue, GuestRam

RING = 16


class Busy(VirtioDevice):
    """Completes whatever it finds; its driver offers as much again at once
    (a driver on another core that keeps the ring full)."""

    device_id = 4
    queues = [QueueSpec("busy", RING)]

    def __init__(self, ram: GuestRam) -> None:
        super().__init__()
        self.calls = 0
        self.driver = DriverQueue(ram, RING)
        self.buffers = [ram.alloc(64) for _ in range(RING)]
        self.offered: dict[int, int] = {}  # head -> buffer

    def offer(self, gpa: int) -> None:
        self.offered[self.driver.offer([Buffer(gpa, 64, writable=True)])] = gpa

    def process(self, queue: SplitQueue) -> None:
        self.calls += 1
        while (chain := queue.pop()) is not None:
            queue.push(chain, 0)
        queue.publish()
        for gpa in [self.offered.pop(used.head) for used in self.driver.collect()]:
            self.offer(gpa)
        self.driver.publish()


def test_a_queue_that_never_empties_lets_other_tasks_run_after_its_slice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``drain`` goes round while there is progress, but returns (so that the
    worker checkpoints) once its time slice is used, not only after its count
    of rounds: a queue whose every round takes long must not hold the event
    loop for all of them."""
    clock = itertools.count()
    monkeypatch.setattr(runtime, "_clock", lambda: next(clock) * 1e-3)  # 1 ms a round
    ram = GuestRam(1 << 20)
    device = Busy(ram)
    state = DeviceState(device)
    queue = state.queues[0]
    driver = device.driver
    queue.set_features(event_idx=False, indirect=False)
    queue.setup(ram.memory(), driver.desc_gpa, driver.avail_gpa, driver.used_gpa)
    for gpa in device.buffers:
        device.offer(gpa)
    driver.publish()
    runner = runtime.QueueRunner(state, queue)
    try:
        assert runner.drain(rounds=64)  # work is left
        assert 1 < device.calls < 64
    finally:
        queue.release()
        ram.close()
