"""The ``outboard`` command: one subcommand per device."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Protocol

import trio

from .backend import VirtioDevice
from .devices import blk, rng
from .transports.vhost_user import serve_connect, serve_listener, serve_path

log = logging.getLogger("outboard")


class DeviceCommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def from_args(self, args: argparse.Namespace) -> VirtioDevice: ...
    def capabilities(self) -> dict[str, object]: ...


DEVICES: dict[str, tuple[DeviceCommand, str, str]] = {
    "rng": (rng.RngDevice, "virtio-rng: entropy for the guest", rng.EPILOG),
    "blk": (blk.BlkDevice, "virtio-blk: a raw image file or block device", blk.EPILOG),
}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"outboard: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outboard", description="Out-of-process virtio device back-ends (vhost-user).")
    sub = parser.add_subparsers(dest="device", required=True, metavar="DEVICE")
    for name, (command, summary, epilog) in DEVICES.items():
        p = sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--socket-path", metavar="PATH",
                           help="listen on this unix socket (the VMM connects)")
        where.add_argument("--connect", metavar="PATH",
                           help="connect to a VMM listening on PATH (QEMU chardev server=on), "
                                "retrying until it appears")
        where.add_argument("--fd", type=int, metavar="N",
                           help="serve on inherited listening socket fd N")
        p.add_argument("--print-capabilities", action="store_true",
                       help="print the back-end's capabilities as JSON and exit")
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="log every protocol message")
        command.add_arguments(p)
    return parser


async def _serve(device: VirtioDevice, args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signal)
        if args.socket_path:
            await serve_path(device, args.socket_path)
        elif args.connect:
            await serve_connect(device, args.connect)
        else:
            sock = socket.socket(fileno=args.fd)
            sock.setblocking(False)
            log.info("serving on inherited fd %d", args.fd)
            await serve_listener(device, trio.socket.from_stdlib_socket(sock))
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = DEVICES[args.device][0]
    if args.print_capabilities:
        print(json.dumps(command.capabilities(), indent=2))
        return 0
    if args.socket_path is None and args.connect is None and args.fd is None:
        parser.error("one of --socket-path, --connect or --fd is required")
    setup_logging(args.verbose)
    try:
        device = command.from_args(args)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        trio.run(_serve, device, args)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
