"""ttrpc, written for this shim (v1.1 wire protocol, as spoken by containerd 1.6 and later).

``codec`` is the sans-IO protocol layer; ``server`` and ``client`` are thin
trio transports on top of it.
"""

from .client import Client, open_client
from .errors import Code, ProtocolError, TTRPCError
from .server import CallContext, Handler, Server

__all__ = [
    "CallContext",
    "Client",
    "Code",
    "Handler",
    "ProtocolError",
    "Server",
    "TTRPCError",
    "open_client",
]
