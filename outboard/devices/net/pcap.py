"""Classic pcap files (LINKTYPE_ETHERNET): what ``--capture`` writes.

The format is libpcap's original one, which Wireshark, tcpdump and every other
capture tool read: a 24-byte file header, then per frame a 16-byte record
header (seconds, microseconds, captured and original length) and the frame.
Both are written in this machine's byte order; readers tell it by the magic.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["LINKTYPE_ETHERNET", "PcapRecord", "PcapWriter", "read_pcap"]

MAGIC = 0xA1B2C3D4
#: the same format with nanosecond timestamps (DPDK's pcap driver writes it)
MAGIC_NS = 0xA1B23C4D
VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
#: the largest frame recorded whole; GSO frames of up to 64 KiB fit
SNAPLEN = 262144

_file_header = struct.Struct("=IHHiIII")
_record_header = struct.Struct("=IIII")


@dataclass(frozen=True)
class PcapRecord:
    seconds: int
    #: the fraction of the second, in microseconds or (nanosecond files) nanoseconds
    fraction: int
    original_length: int
    data: bytes


class PcapWriter:
    """Appends frames to a pcap file; buffered, flushed by ``flush`` and ``close``."""

    def __init__(self, path: str, *, buffer_size: int = 1 << 20) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb", buffering=buffer_size)  # noqa: SIM115
        self._file.write(_file_header.pack(MAGIC, *VERSION, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self._header = bytearray(_record_header.size)
        self.frames = 0

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, frame: bytes | bytearray | memoryview, *more: memoryview) -> None:
        """Record one frame (given whole, or as parts in order)."""
        size = len(frame)
        for part in more:
            size += len(part)
        stamp = time.time_ns() // 1000
        _record_header.pack_into(self._header, 0, stamp // 1_000_000, stamp % 1_000_000,
                                 min(size, SNAPLEN), size)
        write = self._file.write
        write(self._header)
        if size <= SNAPLEN:
            write(frame)
            for part in more:
                write(part)
        else:
            write(b"".join([frame, *more])[:SNAPLEN])
        self.frames += 1

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_pcap(path: str) -> Iterator[PcapRecord]:
    """The records of a classic pcap file of either byte order and timestamp
    resolution (for tests and tools)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _file_header.size:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a pcap file")
    order = "<" if struct.unpack_from("<I", data)[0] in (MAGIC, MAGIC_NS) else ">"
    magic, major, minor, _, _, _, linktype = struct.unpack_from(order + "IHHiIII", data)
    if magic not in (MAGIC, MAGIC_NS) or (major, minor) != VERSION:
        raise ValueError(f"{path}: not a classic pcap file (magic {magic:#x})")
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, not Ethernet")
    record = struct.Struct(order + "IIII")
    offset = _file_header.size
    while offset < len(data):
        if offset + record.size > len(data):
            raise ValueError(f"{path}: truncated record header at {offset}")
        seconds, fraction, caplen, length = record.unpack_from(data, offset)
        offset += record.size
        if offset + caplen > len(data):
            raise ValueError(f"{path}: truncated frame at {offset}")
        yield PcapRecord(seconds, fraction, length, data[offset:offset + caplen])
        offset += caplen
