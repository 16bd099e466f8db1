"""MSI-X against a small model, driven the way a vfio-user client drives it.

The device raises and withdraws vectors; the client masks and unmasks them by
writing the vector table (REGION_WRITE), flips the function mask and the enable
bit in the capability (config space writes), masks and unmasks them with
SET_IRQS, gives vectors new eventfds and takes them away. After every step:
every raised vector has been delivered exactly once — at once, or at the
first moment nothing masks it — and the PBA (REGION_READ) reads what the
model says is pending.
"""

from __future__ import annotations

import os
import struct

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from outboard.backend.fd import OwnedFd
from outboard.backend.pci.capabilities import add_msix
from outboard.backend.pci.config import ConfigSpace
from outboard.backend.pci.function import Bar, PciFunction
from outboard.backend.pci.msix import Msix
from outboard.transports.vfio_user.connection import Request, ServerConnection
from outboard.transports.vfio_user.dma import DmaTable
from outboard.transports.vfio_user.handler import VfioUserHandler
from outboard.transports.vfio_user.wire import (
    HEADER_SIZE,
    Command,
    IrqIndex,
    IrqSet,
    IrqSetFlags,
    RegionAccess,
    RegionIndex,
    VersionHeader,
)

COUNT = 5
MSIX_BAR = 1
PBA_OFFSET = 0x1000


def msix_function(count: int) -> tuple[PciFunction, int]:
    """A bare PCI function with MSI-X in BAR 1 (table at 0, PBA on the next page)."""
    msix = Msix(count)
    config = ConfigSpace()
    config.type0_header(vendor_id=0x1AF4, device_id=0x1044, revision=1, class_code=0xFF0000,
                        subsystem_vendor_id=0x1AF4, subsystem_id=0x44)
    bar = Bar(MSIX_BAR, 0x2000)
    function = PciFunction(config, [bar], msix=msix)
    bar.add("table", 0, msix.table_size, msix.read_table, msix.write_table)
    bar.add("pba", PBA_OFFSET, msix.pba_size, msix.read_pba, lambda offset, data: None)
    cap = add_msix(config, msix, table_bar=MSIX_BAR, table_offset=0, pba_bar=MSIX_BAR,
                   pba_offset=PBA_OFFSET)
    config.seal()
    return function, cap


class Client:
    """Feeds whole messages to the core and the handler, as the socket would."""

    def __init__(self, function: PciFunction) -> None:
        self.conn = ServerConnection()
        self.handler = VfioUserHandler(self.conn, function, DmaTable())
        self.next_id = 0
        self.command(Command.VERSION, bytes(VersionHeader(0, 0)))

    def command(self, command: Command, payload: bytes, fds: list[OwnedFd] | None = None
                ) -> bytes:
        self.next_id += 1
        self.conn.receive(struct.pack("=HHIII", self.next_id, command,
                                      HEADER_SIZE + len(payload), 0, 0) + payload, fds or [])
        req = self.conn.next_event()
        assert isinstance(req, Request)
        answer = self.handler.dispatch(req)
        assert answer is not None
        reply, _ = answer
        msg_id, code, _size, flags, error = struct.unpack_from("=HHIII", reply)
        assert (msg_id, code) == (self.next_id, command)
        assert not flags & 0x20, f"{command.name} refused: errno {error}"
        return reply[HEADER_SIZE:]

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        self.command(Command.REGION_WRITE, bytes(RegionAccess(offset, region, len(data))) + data)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        return self.command(Command.REGION_READ, bytes(RegionAccess(offset, region, count)))[16:]

    def set_irqs(self, flags: int, start: int, count: int, data: bytes = b"",
                 fds: list[OwnedFd] | None = None) -> None:
        self.command(Command.DEVICE_SET_IRQS,
                     bytes(IrqSet(20 + len(data), flags, IrqIndex.MSIX, start, count)) + data,
                     fds)


vectors = st.integers(0, COUNT - 1)


class MsixModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.function, self.cap = msix_function(COUNT)
        self.client = Client(self.function)
        # the test's own end of each vector's eventfd (the server holds a dup)
        self.fds = [self._eventfd() for _ in range(COUNT)]
        self.client.set_irqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 0, COUNT,
                             fds=[OwnedFd(os.dup(fd.fd)) for fd in self.fds])
        # the model
        self.enabled = False
        self.function_masked = False
        self.table_masked = [False] * COUNT  # assigning the eventfds unmasked them
        self.client_masked = [False] * COUNT
        self.has_fd = [True] * COUNT
        self.pending = [False] * COUNT
        self.expected = [0] * COUNT
        self.seen = [0] * COUNT

    @staticmethod
    def _eventfd() -> OwnedFd:
        return OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def deliverable(self, v: int) -> bool:
        return (self.enabled and not self.function_masked and not self.table_masked[v]
                and not self.client_masked[v] and self.has_fd[v])

    def settle(self) -> None:
        """Whatever is pending and deliverable now is delivered, once."""
        for v in range(COUNT):
            if self.pending[v] and self.deliverable(v):
                self.pending[v] = False
                self.expected[v] += 1

    # -- the device --------------------------------------------------------

    @rule(v=vectors)
    def raise_vector(self, v: int) -> None:
        self.function.msix.trigger(v)  # type: ignore[union-attr]
        if self.deliverable(v):
            self.expected[v] += 1
        else:
            self.pending[v] = True

    @rule(v=vectors)
    def withdraw(self, v: int) -> None:
        self.function.msix.withdraw(v)  # type: ignore[union-attr]
        self.pending[v] = False

    # -- the driver, through the client ---------------------------------------

    @rule(v=vectors, masked=st.booleans(), whole_entry=st.booleans())
    def table_mask(self, v: int, masked: bool, whole_entry: bool) -> None:
        if whole_entry:
            entry = struct.pack("<QII", 0xFEE0_0000, v, int(masked))
            self.client.region_write(MSIX_BAR, 16 * v, entry)
        else:
            self.client.region_write(MSIX_BAR, 16 * v + 12, struct.pack("<I", int(masked)))
        self.table_masked[v] = masked
        self.settle()

    @rule(enable=st.booleans(), function_mask=st.booleans())
    def message_control(self, enable: bool, function_mask: bool) -> None:
        control = (1 << 15 if enable else 0) | (1 << 14 if function_mask else 0)
        self.client.region_write(RegionIndex.CONFIG, self.cap + 2,
                                 control.to_bytes(2, "little"))
        self.enabled, self.function_masked = enable, function_mask
        self.settle()

    @rule(v=vectors, masked=st.booleans(), as_bool=st.booleans())
    def set_irqs_mask(self, v: int, masked: bool, as_bool: bool) -> None:
        action = IrqSetFlags.ACTION_MASK if masked else IrqSetFlags.ACTION_UNMASK
        if as_bool:  # the whole range, with only v's boolean set
            data = bytes(1 if i == v else 0 for i in range(COUNT))
            self.client.set_irqs(IrqSetFlags.DATA_BOOL | action, 0, COUNT, data)
        else:
            self.client.set_irqs(IrqSetFlags.DATA_NONE | action, v, 1)
        self.client_masked[v] = masked
        self.settle()

    @rule(v=vectors)
    def set_irqs_trigger(self, v: int) -> None:
        """The client raises the vector itself (DATA_NONE | ACTION_TRIGGER)."""
        self.client.set_irqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, v, 1)
        if self.deliverable(v):
            self.expected[v] += 1
        else:
            self.pending[v] = True

    @rule(v=vectors)
    def new_eventfd(self, v: int) -> None:
        self.drain(v)
        old = self.fds[v]
        self.fds[v] = self._eventfd()
        old.close()
        self.client.set_irqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, v, 1,
                             fds=[OwnedFd(os.dup(self.fds[v].fd))])
        self.has_fd[v] = True
        self.table_masked[v] = False
        self.settle()

    @rule(v=vectors)
    def take_eventfd_away(self, v: int) -> None:
        self.client.set_irqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, v, 1)
        self.has_fd[v] = False
        self.table_masked[v] = True

    # -- what must hold ------------------------------------------------------

    def drain(self, v: int) -> None:
        try:
            self.seen[v] += int.from_bytes(os.read(self.fds[v].fd, 8), "little")
        except BlockingIOError:
            pass

    @invariant()
    def every_raised_vector_is_delivered_exactly_once(self) -> None:
        for v in range(COUNT):
            self.drain(v)
        assert self.seen == self.expected

    @invariant()
    def pba_reads_what_is_pending(self) -> None:
        pba = int.from_bytes(self.client.region_read(MSIX_BAR, PBA_OFFSET, 8), "little")
        assert pba == sum(1 << v for v in range(COUNT) if self.pending[v])

    def teardown(self) -> None:
        self.function.close()
        for fd in self.fds:
            fd.close()


MsixModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                       deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestMsixModel = pytest.mark.slow(MsixModel.TestCase)
