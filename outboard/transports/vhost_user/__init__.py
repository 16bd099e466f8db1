"""vhost-user: the protocol core, the request handler and the trio server."""

from .backend import VhostUserBackend
from .connection import NEED_DATA, BackendConnection, Request
from .server import serve_connect, serve_connection, serve_listener, serve_path
from .wire import REQUESTS, FrontendReq, ProtocolFeature

__all__ = [
    "NEED_DATA",
    "REQUESTS",
    "BackendConnection",
    "FrontendReq",
    "ProtocolFeature",
    "Request",
    "VhostUserBackend",
    "serve_connect",
    "serve_connection",
    "serve_listener",
    "serve_path",
]
