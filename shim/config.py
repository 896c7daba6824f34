"""What the launcher hands to the long-lived shim process.

Plain data, serialisable to one JSON argument, so a shim can be started by
exec (JSON in the environment) or, later, forked from a warm template that
receives the same JSON over a socket.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

#: Environment variable carrying the JSON config from launcher to shim.
CONFIG_ENV = "SHIM_CONFIG"


@dataclass
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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ShimConfig":
        return cls(**json.loads(text))
