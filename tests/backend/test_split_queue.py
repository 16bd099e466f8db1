"""The split ring against a model driver: hostile chains and a state machine."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from outboard.backend import SplitQueue
from outboard.backend.virtqueue.split import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    need_event,
)
from outboard.testing import Buffer, DriverQueue, GuestRam


def make(size: int = 8, *, event_idx: bool = False, indirect: bool = True,
         ram_size: int = 1 << 20) -> tuple[GuestRam, DriverQueue, SplitQueue]:
    ram = GuestRam(ram_size)
    driver = DriverQueue(ram, size, event_idx=event_idx)
    queue = SplitQueue(0, size)
    queue.set_features(event_idx=event_idx, indirect=indirect)
    queue.setup(ram.memory(), driver.desc_gpa, driver.avail_gpa, driver.used_gpa)
    return ram, driver, queue


# -- hostile chains ----------------------------------------------------------

class TestHostileChains:
    """Each hostile chain fails that request only: logged, returned with length 0,
    and the next good chain is still served."""

    def setup_method(self) -> None:
        self.ram, self.driver, self.queue = make()
        self.errors: list[str] = []
        self.queue.on_error = lambda q, why: self.errors.append(why)
        self.good = self.ram.alloc(64)

    def teardown_method(self) -> None:
        self.queue.release()
        self.driver._desc.release()
        self.ram.close()

    def offer_raw(self, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
        for i, (addr, length, flags, nxt) in enumerate(descs):
            self.driver.write_desc(i, addr, length, flags, nxt)
        self.driver.make_available(head)

    def expect_refused(self, reason: str, caplog: pytest.LogCaptureFixture) -> None:
        # then one good chain behind it
        self.driver.free = [7]
        good = self.driver.offer([Buffer(self.good, 64, writable=True)])
        self.driver.publish()
        with caplog.at_level(logging.WARNING, logger="outboard.virtqueue"):
            chains = list(self.queue)
        assert [c.head for c in chains] == [good]
        assert len(self.errors) == 1 and reason in self.errors[0]
        warnings = [r for r in caplog.records if r.name == "outboard.virtqueue"]
        assert len(warnings) == 1 and reason in warnings[0].getMessage()
        self.queue.push(chains[0], 0)
        self.queue.publish()
        used = self.driver.collect()
        assert used[0].written == 0  # the hostile request failed, with no data

    def test_descriptor_loop(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 8, VIRTQ_DESC_F_NEXT, 1), (self.good, 8, VIRTQ_DESC_F_NEXT, 0)])
        self.expect_refused("loop", caplog)

    def test_self_loop(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 8, VIRTQ_DESC_F_NEXT, 0)])
        self.expect_refused("loop", caplog)

    def test_next_out_of_range(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 8, VIRTQ_DESC_F_NEXT, 200)])
        self.expect_refused("out of range", caplog)

    def test_address_outside_memory(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(1 << 40, 8, 0, 0)])
        self.expect_refused("not in guest memory", caplog)

    def test_range_straddling_the_end_of_memory(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.ram.size - 4, 8, VIRTQ_DESC_F_WRITE, 0)])
        self.expect_refused("not in guest memory", caplog)

    def test_huge_length(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 0xFFFF_FFFF, VIRTQ_DESC_F_WRITE, 0)])
        self.expect_refused("not in guest memory", caplog)

    def test_zero_length(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 0, VIRTQ_DESC_F_WRITE, 0)])
        self.expect_refused("zero-length", caplog)

    def test_readable_after_writable(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                        (self.good, 8, 0, 0)])
        self.expect_refused("readable descriptor after", caplog)

    def test_indirect_with_next(self, caplog: pytest.LogCaptureFixture) -> None:
        table = self.ram.alloc(32)
        self.offer_raw([(table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1),
                        (self.good, 8, 0, 0)])
        self.expect_refused("NEXT", caplog)

    def test_nested_indirect(self, caplog: pytest.LogCaptureFixture) -> None:
        table = self.ram.alloc(16)
        struct.pack_into("<QIHH", self.ram.view(table, 16), 0, table, 16,
                         VIRTQ_DESC_F_INDIRECT, 0)
        self.offer_raw([(table, 16, VIRTQ_DESC_F_INDIRECT, 0)])
        self.expect_refused("nested", caplog)

    def test_indirect_table_bad_size(self, caplog: pytest.LogCaptureFixture) -> None:
        self.offer_raw([(self.good, 24, VIRTQ_DESC_F_INDIRECT, 0)])
        self.expect_refused("indirect table", caplog)

    def test_indirect_loop(self, caplog: pytest.LogCaptureFixture) -> None:
        table = self.ram.alloc(32)
        view = self.ram.view(table, 32)
        struct.pack_into("<QIHH", view, 0, self.good, 8, VIRTQ_DESC_F_NEXT, 1)
        struct.pack_into("<QIHH", view, 16, self.good, 8, VIRTQ_DESC_F_NEXT, 0)
        self.offer_raw([(table, 32, VIRTQ_DESC_F_INDIRECT, 0)])
        self.expect_refused("loop", caplog)

    def test_indirect_not_negotiated(self, caplog: pytest.LogCaptureFixture) -> None:
        self.queue.set_features(event_idx=False, indirect=False)
        table = self.ram.alloc(16)
        struct.pack_into("<QIHH", self.ram.view(table, 16), 0, self.good, 8, 0, 0)
        self.offer_raw([(table, 16, VIRTQ_DESC_F_INDIRECT, 0)])
        self.expect_refused("INDIRECT_DESC", caplog)

    def test_head_out_of_range_is_skipped(self, caplog: pytest.LogCaptureFixture) -> None:
        self.driver.make_available(9999)
        self.expect_refused("head index", caplog)

    def test_avail_index_jump_stops_the_queue(self, caplog: pytest.LogCaptureFixture) -> None:
        self.driver._avail_h[1] = 100  # more than the ring holds
        with caplog.at_level(logging.ERROR, logger="outboard.virtqueue"):
            assert self.queue.pop() is None
        assert self.queue.broken
        assert any("available index" in r.getMessage() for r in caplog.records)

    def test_hostile_chain_never_writes_outside_its_buffers(self) -> None:
        # A chain whose second descriptor is out of range must not be processed
        # at all: the device never sees the first (valid) descriptor either.
        self.offer_raw([(self.good, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                        (1 << 40, 8, VIRTQ_DESC_F_WRITE, 0)])
        self.driver.publish()
        before = bytes(self.ram.view(0, self.ram.size))
        assert list(self.queue) == []
        self.queue.publish()
        after = bytes(self.ram.view(0, self.ram.size))
        # Only the used ring changed.
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        used = range(self.driver.used_gpa, self.driver.used_gpa + 6 + 8 * 8)
        assert changed and all(i in used for i in changed)


def test_need_event_matches_the_definition() -> None:
    # interrupt when the index passes event: event in [old, new)
    for old in (0, 65530, 65535):
        for step in range(0, 8):
            new = (old + step) & 0xFFFF
            for delta in range(-3, 10):
                event = (old + delta) & 0xFFFF
                crossed = 0 <= delta < step
                assert need_event(event, new, old) == crossed


# -- the state machine -------------------------------------------------------

class SplitRingMachine(RuleBasedStateMachine):
    """A model driver and the device's SplitQueue share one ring.

    Checks: every offered head comes back exactly once with what the device
    wrote; indices wrap at 2^16; with event-idx the device interrupts whenever
    the driver's used_event was passed, and the driver kicks whenever the
    device asked for it (no lost interrupt, no lost kick).
    """

    @initialize(size=st.sampled_from([2, 4, 8, 16]), event_idx=st.booleans(),
                base=st.one_of(st.just(0), st.integers(65536 - 40, 65535),
                               st.integers(0, 65535)))
    def setup(self, size: int, event_idx: bool, base: int) -> None:
        self.ram, self.driver, self.queue = make(size, event_idx=event_idx)
        self.size = size
        self.event_idx = event_idx
        # Start both sides at the same, possibly nearly wrapping, index.
        self.driver.avail_idx = base
        self.driver._avail_h[1] = base
        self.driver._used_h[1] = base
        self.driver.last_used_idx = base
        self.queue.last_avail_idx = base
        self.queue.sync_used_idx()
        self.offered: dict[int, int] = {}  # head -> buffer gpa
        self.popped: list[int] = []  # heads the device holds
        self.completed: dict[int, int] = {}  # head -> bytes written, not yet collected
        # The runtime arms kicks when a queue starts (QueueRunner.drain).
        assert not self.queue.enable_kicks()
        self.kicks_wanted = True  # device state: will it need a kick for new work?
        self.interrupt_pending = False
        self.used_event_armed = not event_idx  # driver asked for an interrupt

    def teardown(self) -> None:
        self.queue.release()
        self.ram.close()

    @precondition(lambda self: len(self.driver.free) > 0)
    @rule()
    def offer(self) -> None:
        gpa = self.ram.alloc(32)
        head = self.driver.offer([Buffer(gpa, 32, writable=True)])
        assert head not in self.offered and head not in self.popped
        self.offered[head] = gpa
        kick = self.driver.publish()
        if kick:
            self.kicks_wanted = False  # a kick is on its way; the device will look
        else:
            # No lost kicks: the driver may skip the kick only while the device
            # has a wake-up pending or has not re-armed since it last looked.
            assert not self.kicks_wanted, "driver skipped a kick the device asked for"

    @rule(limit=st.integers(1, 16), reverse=st.booleans())
    def device_runs(self, limit: int, reverse: bool) -> None:
        """The device pops up to ``limit`` chains, then completes them in some order."""
        for _ in range(limit):
            chain = self.queue.pop()
            if chain is None:
                break
            assert chain.head in self.offered, f"head {chain.head} was never offered"
            assert len(chain.writable) == 1 and chain.readable == []
            self.popped.append(chain.head)
            del self.offered[chain.head]
        self.kicks_wanted = False

    @precondition(lambda self: self.popped)
    @rule(reverse=st.booleans(), count=st.integers(1, 16))
    def device_completes(self, reverse: bool, count: int) -> None:
        order = list(reversed(self.popped)) if reverse else list(self.popped)
        done = order[:count]
        for head in done:
            self.popped.remove(head)
            written = head + 1
            self.queue.push_head(head, written)
            self.completed[head] = written
        old = self.driver.device_used_idx
        notify = self.queue.publish()
        new = self.driver.device_used_idx
        assert (new - old) & 0xFFFF == len(done)
        if self.event_idx:
            event = self.driver._avail_h[2 + self.size]
            if need_event(event, new, old):
                assert notify, "event-idx skipped a needed interrupt"
        else:
            assert notify
        self.interrupt_pending |= notify

    @rule()
    def device_rearms(self) -> None:
        """The device drained (as far as it chose) and asks for kicks again."""
        more = self.queue.enable_kicks()
        assert more == (len(self.offered) > 0)
        # With work already waiting the device goes round again instead of sleeping.
        self.kicks_wanted = not more

    @rule()
    def driver_collects(self) -> None:
        for used in self.driver.collect():
            assert used.head in self.completed, f"head {used.head} used twice or never popped"
            assert used.written == self.completed.pop(used.head)
        if self.event_idx:
            self.driver.set_used_event(self.driver.last_used_idx)

    @invariant()
    def heads_are_accounted_for(self) -> None:
        if not hasattr(self, "driver"):
            return
        busy = set(self.offered) | set(self.popped) | set(self.completed)
        assert len(busy) == len(self.offered) + len(self.popped) + len(self.completed)
        assert busy.isdisjoint(self.driver.free)
        assert len(busy) + len(self.driver.free) == self.size


SplitRingMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_split_ring_state_machine = SplitRingMachine.TestCase
