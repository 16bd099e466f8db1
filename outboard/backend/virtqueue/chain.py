"""A descriptor chain: device-readable segments, then device-writable ones."""

from __future__ import annotations

__all__ = ["Chain"]


class Chain:
    """One request as the device sees it.

    ``readable`` and ``writable`` are memoryviews straight into guest memory,
    in chain order. The device writes its answer into ``writable`` (``write``
    does it in order) and then gives the chain back with ``queue.push(chain,
    written)``.
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_size(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_size(self) -> int:
        return sum(len(v) for v in self.writable)

    def read(self) -> bytes:
        """All readable bytes, copied."""
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable segments from byte ``offset``; return the count."""
        src = memoryview(data)
        done = 0
        for seg in self.writable:
            n = len(seg)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(src) - done)
            seg[offset:offset + take] = src[done:done + take]
            done += take
            offset = 0
            if done == len(src):
                break
        return done

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={self.readable_size}B/{len(self.readable)}, "
                f"writable={self.writable_size}B/{len(self.writable)})")
