"""Runtime options: what containerd sends in CreateTaskRequest.options, and
what the shim leaves in the bundle so the ``delete`` action can find runc again.

Standard library only (it is on the launcher's path): the typed
``containerd.runc.v1.Options`` is decoded with protobuf by the daemon
(shim.daemon.service.options_from_any); the CRI TOML form is read here.

containerd's typeurl writes bare type names (``containerd.runc.v1.Options``),
which protobuf's ``Any.Unpack`` does not accept, so we match names ourselves.
"""

from __future__ import annotations

import os

from .bundle import PRIVATE, write_atomic
from .errors import InvalidArgument
from .record import as_dict, field_names, record

RUNC_ROOT = "/run/containerd/runc"
OPTIONS_FILE = "options.json"
RUNTIME_FILE = "runtime"
RUNC_ROOT_FILE = "runc-root"  # the runc --root in use, plain text: read by delete without json


@record
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
    criu_image_path: str = ""
    criu_work_path: str = ""

    @property
    def binary(self) -> str:
        return self.binary_name or "runc"

    def runc_root(self, namespace: str) -> str:
        return os.path.join(self.root or RUNC_ROOT, namespace)

    def write(self, bundle: str, namespace: str) -> None:
        import json

        write_atomic(os.path.join(bundle, OPTIONS_FILE), json.dumps(as_dict(self)), PRIVATE)
        write_atomic(os.path.join(bundle, RUNTIME_FILE), self.binary, PRIVATE)
        write_atomic(os.path.join(bundle, RUNC_ROOT_FILE), self.runc_root(namespace), PRIVATE)

    @classmethod
    def read(cls, bundle: str) -> RuncOptions:
        """Options a shim left in ``bundle``; defaults if there are none."""
        import json

        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        known = set(field_names(cls))
        return cls(**{k: v for k, v in data.items() if k in known})


def runtime_options_toml(value: bytes) -> str:
    """The TOML a runtimeoptions.v1.Options names: its config_body, else the file at config_path."""
    config_path, body = _runtime_options(value)
    if not body and config_path:
        try:
            with open(config_path, "rb") as f:
                body = f.read()
        except OSError as e:
            raise InvalidArgument(f"runtime options config_path {config_path}: {e.strerror}") from e
    try:
        return body.decode()
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"runtime options TOML is not UTF-8: {e}") from e


def _runtime_options(value: bytes) -> tuple[str, bytes]:
    """runtimeoptions.v1.Options{type_url=1, config_path=2, config_body=3}, decoded by hand:
    the launcher reads it too (ShimCgroup) and must not import protobuf."""
    from . import wire

    config_path, body = "", b""
    try:
        for number, kind, field in wire.fields(value):
            if kind == 2 and number == 2:
                config_path = wire.text(field)
            elif kind == 2 and number == 3:
                body = bytes(field)
    except wire.Malformed as e:
        raise InvalidArgument(f"runtime options: {e}") from e
    return config_path, body


def from_toml(text: str) -> RuncOptions:
    """runc options from a CRI runtime options TOML (``BinaryName = "crun"`` or ``binary_name``)."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"runtime options TOML: {e}") from e
    defaults = RuncOptions()
    by_key = {_camel(name).lower(): name for name in field_names(RuncOptions)}
    by_key.update({name: name for name in field_names(RuncOptions)})
    values = {}
    for key, value in data.items():
        name = by_key.get(key) or by_key.get(key.lower())
        if name is None:
            continue  # options of later releases, or for other runtimes
        expected = type(getattr(defaults, name))
        if not isinstance(value, expected):
            raise InvalidArgument(f"runtime options TOML: {key} must be {expected.__name__}")
        values[name] = value
    return RuncOptions(**values)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
