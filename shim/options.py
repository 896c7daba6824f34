"""Runtime options: what containerd sends in CreateTaskRequest.options, and
what the shim leaves in the bundle so the ``delete`` action can find runc again.

containerd's typeurl writes bare type names (``containerd.runc.v1.Options``),
which protobuf's ``Any.Unpack`` does not accept, so we match names ourselves.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from .bundle import write_atomic

RUNC_ROOT = "/run/containerd/runc"
OPTIONS_FILE = "options.json"
RUNTIME_FILE = "runtime"
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"


@dataclass
class RuncOptions:
    binary_name: str = ""
    root: str = ""
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    criu_path: str = ""

    @property
    def binary(self) -> str:
        return self.binary_name or "runc"

    def runc_root(self, namespace: str) -> str:
        return os.path.join(self.root or RUNC_ROOT, namespace)

    def write(self, bundle: str) -> None:
        write_atomic(os.path.join(bundle, OPTIONS_FILE), json.dumps(asdict(self)))
        write_atomic(os.path.join(bundle, RUNTIME_FILE), self.binary)

    @classmethod
    def read(cls, bundle: str) -> "RuncOptions":
        """Options a shim left in ``bundle``; defaults if there are none."""
        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def from_any(type_url: str, value: bytes) -> RuncOptions:
    """Decode CreateTaskRequest.options; unknown or empty → defaults."""
    if not type_url or type_name(type_url) != RUNC_OPTIONS_TYPE:
        return RuncOptions()
    from .proto import runc_options_pb2

    msg = runc_options_pb2.Options.FromString(value)
    return RuncOptions(
        binary_name=msg.binary_name,
        root=msg.root,
        systemd_cgroup=msg.systemd_cgroup,
        no_pivot_root=msg.no_pivot_root,
        no_new_keyring=msg.no_new_keyring,
        shim_cgroup=msg.shim_cgroup,
        io_uid=msg.io_uid,
        io_gid=msg.io_gid,
        criu_path=msg.criu_path,
    )
