"""The error kinds of outboard; each says whether the connection must go."""

from __future__ import annotations


class OutboardError(Exception):
    """Base class. ``fatal`` means the connection that saw it must be dropped."""

    fatal = False


class ProtocolError(OutboardError):
    fatal = True


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""

    def __init__(self, message: str, *, fatal: bool = True, request: object = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        #: the request that broke the rule, when it was parsed far enough to answer
        self.request = request


class LocalProtocolError(ProtocolError):
    """We tried to break the protocol: a bug on this side."""


class GuestMemoryError(OutboardError):
    """A guest address that no mapped region covers (or a range that leaves it)."""


class DeviceError(OutboardError):
    """A request the device could not serve; the connection stays."""


class ChainError(OutboardError):
    """A descriptor chain that breaks the virtqueue rules; only that request fails."""
