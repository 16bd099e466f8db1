"""vfio-user: the protocol core, the request handler and the trio server."""

from .connection import (
    NEED_DATA,
    CommandFailed,
    MessageError,
    Reply,
    Request,
    ServerConnection,
)
from .dma import DmaRegion, DmaTable
from .handler import VfioUserHandler
from .server import VfioUserSession, serve_connection, serve_listener, serve_path
from .wire import COMMANDS, Command, CommandRule, Direction, FdRule

__all__ = [
    "COMMANDS",
    "NEED_DATA",
    "Command",
    "CommandFailed",
    "CommandRule",
    "Direction",
    "DmaRegion",
    "DmaTable",
    "FdRule",
    "MessageError",
    "Reply",
    "Request",
    "ServerConnection",
    "VfioUserHandler",
    "VfioUserSession",
    "serve_connection",
    "serve_listener",
    "serve_path",
]
