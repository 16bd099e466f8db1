"""virtio-rng (device id 4): entropy from os.urandom or from a file.

One queue (``requestq``); the driver offers writable buffers and the device
fills them (virtio 1.2, 5.4). A file source is read in order and wraps at its
end, so a fixed file gives a predictable stream.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import BinaryIO

from ..backend import QueueSpec, SplitQueue, VirtioDevice, VirtioDeviceId

__all__ = ["FileSource", "RngDevice"]

EPILOG = """\
attach to QEMU (guest RAM must be shared):
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=rng0,path=SOCKET -device vhost-user-rng-pci,chardev=rng0
"""


class FileSource:
    """Bytes of a file, in order, starting over at its end."""

    def __init__(self, path: str) -> None:
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - lives with the device
        if os.fstat(self._file.fileno()).st_size == 0:
            self._file.close()
            raise ValueError(f"{path} is empty")

    def __call__(self, size: int) -> bytes:
        out = self._file.read(size)
        while len(out) < size:
            self._file.seek(0)
            out += self._file.read(size - len(out))
        return out

    def close(self) -> None:
        self._file.close()


class RngDevice(VirtioDevice):
    device_id = VirtioDeviceId.RNG
    type_name = "rng"

    def __init__(self, source: FileSource | None = None, *, queue_size: int = 256,
                 max_request: int = 64 * 1024) -> None:
        super().__init__()
        self.read_entropy = source if source is not None else os.urandom
        self.queue_size = queue_size
        self.max_request = max_request
        self.bytes_served = 0

    def close(self) -> None:
        if isinstance(self.read_entropy, FileSource):
            self.read_entropy.close()

    @property
    def queues(self) -> Sequence[QueueSpec]:
        return (QueueSpec("requestq", self.queue_size),)

    def process(self, queue: SplitQueue) -> None:
        for chain in queue:
            want = min(chain.writable_size, self.max_request)
            written = chain.write(self.read_entropy(want)) if want else 0
            self.bytes_served += written
            queue.push(chain, written)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--source", metavar="FILE",
                            help="serve the bytes of FILE (in order, wrapping) "
                                 "instead of os.urandom")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RngDevice:
        return cls(FileSource(args.source) if args.source else None)

    @classmethod
    def capabilities(cls) -> dict[str, object]:
        return {"type": "rng"}
