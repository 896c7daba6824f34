"""What the launcher hands to the long-lived shim process.

Plain data, serialisable to one Python literal, so a shim can be started by
exec (a literal in the environment) or, later, forked from a warm template that
receives the same JSON over a socket.
"""

from __future__ import annotations

from .record import as_dict, record

#: Environment variable carrying the config from launcher to shim.
CONFIG_ENV = "SHIM_CONFIG"


@record
class ShimConfig:
    namespace: str
    id: str
    bundle: str
    address: str = ""  # containerd's gRPC socket (-address)
    publish_binary: str = ""
    ttrpc_address: str = ""  # where events go (env TTRPC_ADDRESS)
    socket_path: str = ""  # the shim's own listening socket
    listen_fd: int = 3
    debug: bool = False
    thp_original: int = 0

    def encode(self) -> str:
        """A Python literal: the launcher writes it without importing json (~7 ms)."""
        return repr(as_dict(self))

    @classmethod
    def decode(cls, text: str) -> "ShimConfig":
        import ast

        return cls(**ast.literal_eval(text))
