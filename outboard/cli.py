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
from .devices import blk, net, rng
from .transports import vfio_user
from .transports.vhost_user import serve_connect, serve_listener, serve_path

log = logging.getLogger("outboard")


class DeviceCommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def from_args(self, args: argparse.Namespace) -> VirtioDevice: ...
    def capabilities(self) -> dict[str, object]: ...


DEVICES: dict[str, tuple[DeviceCommand, str, str]] = {
    "rng": (rng.RngDevice, "virtio-rng: entropy for the guest", rng.EPILOG),
    "blk": (blk.BlkDevice, "virtio-blk: a raw image file or block device", blk.EPILOG),
    "net": (net.NetDevice, "virtio-net: a tap, an in-process switch, a loopback", net.EPILOG),
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
        where.add_argument("--socket-path", metavar="PATH", action="append",
                           help="listen on this unix socket (the VMM connects); net "
                                "takes it again for each further device")
        where.add_argument("--connect", metavar="PATH",
                           help="connect to a VMM listening on PATH (QEMU chardev server=on), "
                                "retrying until it appears")
        where.add_argument("--fd", type=int, metavar="N",
                           help="serve on inherited listening socket fd N")
        p.add_argument("--print-capabilities", action="store_true",
                       help="print the back-end's capabilities as JSON and exit")
        p.add_argument("--transport", choices=("vhost-user", "vfio-user"),
                       default="vhost-user",
                       help="the protocol the VMM speaks (default vhost-user); with vfio-user "
                            "the device is a virtio-pci function (QEMU's vfio-user-pci)")
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="log every protocol message")
        command.add_arguments(p)
    return parser


async def _serve(devices: Sequence[VirtioDevice], args: argparse.Namespace) -> None:
    device = devices[0]
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signal)
        vfio = args.transport == "vfio-user"
        if args.socket_path:
            async with trio.open_nursery() as servers:
                for each, path in zip(devices, args.socket_path, strict=True):
                    await servers.start(vfio_user.serve_path if vfio else serve_path, each, path)
        elif args.connect:
            await serve_connect(device, args.connect)
        else:
            sock = socket.socket(fileno=args.fd)
            sock.setblocking(False)
            log.info("serving on inherited fd %d", args.fd)
            await (vfio_user.serve_listener if vfio else serve_listener)(
                device, trio.socket.from_stdlib_socket(sock))
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
    if args.transport == "vfio-user" and args.connect:
        parser.error("--connect is for vhost-user: a vfio-user client connects to the server")
    setup_logging(args.verbose)
    count = len(args.socket_path or [None])
    several = getattr(command, "devices_from_args", None)
    if count > 1 and several is None:
        parser.error(f"{args.device} serves one device: give --socket-path once")
    try:
        devices: list[VirtioDevice] = (
            several(args, count) if several is not None else [command.from_args(args)])
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        trio.run(_serve, devices, args)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for device in devices:
            device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
