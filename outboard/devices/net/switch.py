"""An in-process learning L2 switch: net devices of one outboard process talk to
each other through it, without root and without a tap.

Each device gets a ``SwitchPort``. A frame a driver sends is looked at once:
its source address is learnt for the port it came from; a broadcast or
multicast frame, or one for an address not learnt yet, is flooded to every
other port; a frame for a learnt address goes to that port alone. Delivery is
synchronous: the frame is copied from the sender's transmit buffer into the
receiver's receive buffer, and each receiver is interrupted once per burst.
Learnt addresses do not age; an address that moves is learnt again from its
next frame.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...backend import bit
from .port import Port
from .wire import NetFeature

if TYPE_CHECKING:
    from .device import NetDevice

__all__ = ["Switch", "SwitchPort"]

_macs = struct.Struct("6s6s").unpack_from


class Switch:
    """A named switch; ``port()`` plugs a new device in."""

    def __init__(self, name: str = "switch") -> None:
        self.name = name
        self.ports: list[SwitchPort] = []
        #: learnt address -> port
        self.table: dict[bytes, SwitchPort] = {}
        self.forwarded = 0
        self.flooded = 0

    def port(self) -> SwitchPort:
        port = SwitchPort(self, len(self.ports))
        self.ports.append(port)
        for each in self.ports:
            each.others = None
        return port

    def forget(self, port: SwitchPort) -> None:
        """Drop what was learnt on ``port`` (its driver went away)."""
        for mac in [mac for mac, where in self.table.items() if where is port]:
            del self.table[mac]

    def __repr__(self) -> str:
        return f"Switch({self.name!r}, {len(self.ports)} ports, {len(self.table)} addresses)"


Deliver = Callable[[memoryview, int], None]


def _drop(packet: memoryview, pair: int) -> None:
    """The receiving end of a port no device is attached to yet."""


class SwitchPort(Port):
    """One device's port on a ``Switch``."""

    # A checksum the sender left to the device is finished in software for a
    # receiver that cannot take it partial; segmentation offloads are not offered.
    features = bit(NetFeature.CSUM) | bit(NetFeature.GUEST_CSUM)

    def __init__(self, switch: Switch, number: int) -> None:
        super().__init__()
        self.switch = switch
        self.number = number
        self.table = switch.table
        #: hands a packet to this port's device (``NetDevice.deliver``)
        self.deliver: Deliver = _drop
        #: the ``deliver`` of every other port, for flooding (rebuilt when ports come)
        self.others: list[Deliver] | None = None

    def attach(self, device: NetDevice) -> None:
        super().attach(device)
        self.deliver = device.deliver
        for each in self.switch.ports:
            each.others = None

    def send(self, packet: memoryview, pair: int) -> None:
        dst, src = _macs(packet, 12)
        table = self.table
        table[src] = self  # learn (a multicast source is never looked up)
        if not dst[0] & 1:
            out = table.get(dst)
            if out is not None:
                if out is not self:
                    self.switch.forwarded += 1
                    out.deliver(packet, pair)
                return
        self.switch.flooded += 1
        others = self.others
        if others is None:
            others = self.others = [p.deliver for p in self.switch.ports if p is not self]
        for deliver in others:
            deliver(packet, pair)

    def end_batch(self) -> None:
        for port in self.switch.ports:
            if port._device is not None:
                port._device.end_receive()

    def reset(self) -> None:
        self.switch.forget(self)

    def describe(self) -> str:
        return f"port {self.number} of switch {self.switch.name}"
