"""The ``-info`` flag: what this runtime is and what its OCI runtime can do.

containerd 2.x runs ``<shim> [flags] -info`` with the runtime options (a
protobuf ``Any``) on stdin before it creates a task, and reads a protobuf
``containerd.types.RuntimeInfo`` from stdout (pkg/shim/shim.go ``runInfo``).
CRI uses its ``features`` (the JSON of ``runc features``) to decide, e.g.,
whether idmapped mounts can be asked for; without an answer it logs "failed
to load runtime info" on every create.

Lean like ``start``: no protobuf import, the few fields are encoded by hand
(``tests/test_info.py`` decodes the result with the generated module).
"""

from __future__ import annotations

import os

from shim import __version__
from shim.common.wire import RUNC_OPTIONS_TYPE, RUNTIME_OPTIONS_TYPE, Malformed, bytes_field, fields, text

from .bootstrap import RawAny, decode_any

RUNTIME_NAME = "io.containerd.runc.v2-py"
#: containerd's typeurl for opencontainers/runtime-spec specs-go/features.Features (JSON value).
FEATURES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
DEFAULT_BINARY = "runc"


class InfoError(Exception):
    """Options that cannot be read, or a runtime binary that cannot be found."""


def binary_name(options: RawAny | None) -> str:
    """BinaryName from containerd.runc.v1.Options (field 6) or a runtimeoptions TOML."""
    if options is None or not options.type_url:
        return DEFAULT_BINARY
    if options.type_name == RUNC_OPTIONS_TYPE:
        name = ""
        for number, wire, value in fields(options.value):
            if number == 6 and wire == 2:
                name = text(value)
        return name or DEFAULT_BINARY
    if options.type_name == RUNTIME_OPTIONS_TYPE:
        from shim.common.errors import ShimError
        from shim.common.options import from_toml, runtime_options_toml

        try:
            return from_toml(runtime_options_toml(options.value)).binary
        except ShimError as e:
            raise InfoError(str(e)) from e
    return DEFAULT_BINARY


def look_path(name: str, path: str | None = None) -> str:
    """Like Go's exec.LookPath: a name with a slash is used as is, else searched in PATH."""
    if "/" in name:
        if os.access(name, os.X_OK):
            return os.path.abspath(name)
        raise InfoError(f"failed to look up the path of {name!r}: not an executable")
    for directory in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise InfoError(f"failed to look up the path of {name!r}: executable file not found in $PATH")


def features(binary: str) -> bytes | None:
    """``<binary> features`` output, or None when the runtime has no such command (crun 1.8)."""
    import subprocess

    try:
        done = subprocess.run([binary, "features"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = done.stdout.strip()
    if done.returncode != 0 or not out.startswith(b"{"):
        return None
    return out


def encode_runtime_info(options: RawAny | None, features_json: bytes | None) -> bytes:
    """containerd.types.RuntimeInfo{name=1, version=2 {version=1}, options=3, features=4}."""
    out = bytes_field(1, RUNTIME_NAME.encode())
    out += bytes_field(2, bytes_field(1, __version__.encode()))
    if options is not None and options.type_url:
        out += bytes_field(3, _any(options.type_url, options.value))
    if features_json is not None:
        out += bytes_field(4, _any(FEATURES_TYPE, features_json))
    return out


def _any(type_url: str, value: bytes) -> bytes:
    return bytes_field(1, type_url.encode()) + bytes_field(2, value)


def runtime_info(stdin: bytes) -> bytes:
    try:
        options = decode_any(stdin) if stdin else None
    except (Malformed, ValueError) as e:
        raise InfoError(f"failed to read runtime options: {e}") from e
    try:
        binary = look_path(binary_name(options))
    except (Malformed, ValueError) as e:
        raise InfoError(f"failed to read runtime options: {e}") from e
    return encode_runtime_info(options, features(binary))
