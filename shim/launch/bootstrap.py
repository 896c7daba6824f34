"""The ``start`` action's conversation with containerd, for every release line.

Pure (no I/O, no trio, no protobuf import): the launcher runs on every
container start, so the few protobuf fields involved are decoded and encoded
by hand here; ``tests/test_bootstrap.py`` checks the hand codec against the
module generated from ``shim/proto/bootstrap.proto``. Table and sources:
``shim/proto/BOOTSTRAP.md``. Every release runs
``<shim> -namespace NS -address GRPC -publish-binary BIN -id ID [-debug] start``
with the bundle as cwd and reads the answer from combined stdout+stderr, so
nothing may ever go to stderr. What differs:

containerd 1.6 (runtime/v2/shim/util.go ``Command``, runtime/v2/binary.go ``Start``)
    env: TTRPC_ADDRESS (no MAX_SHIM_VERSION). stdin: the runtime options as a
    protobuf ``Any``, or nothing. Answer: the plain address, which containerd
    trims (``strings.TrimSpace``) and dials.

containerd 1.7 (runtime/v2/shim/util.go, runtime/v2/shim.go ``parseStartResponse``)
    env adds MAX_SHIM_VERSION=2, GRPC_ADDRESS, NAMESPACE; stdin as 1.6.
    containerd accepts JSON ``{"version":2,"address":…,"protocol":"ttrpc"}``;
    anything that is not JSON (or version < 2) is a plain ttrpc address;
    version > 2 is rejected. (The 1.7 Go shim prints the plain address; it
    never reads MAX_SHIM_VERSION.) We answer JSON version 2.

containerd 2.0–2.2 (pkg/shim/util.go, core/runtime/v2/shim.go)
    env and stdin exactly as 1.7 — MAX_SHIM_VERSION is still the constant 2.
    ``CurrentShimVersion = 3``: versions up to 3 accepted, a plain address or
    version < 2 becomes version 2, served through the v2 task API bridge
    (core/runtime/v2/bridge.go). Answer: JSON version 2. (The 2.x Go shim always
    prints version 3; version 3 also tells containerd the shim implements the
    sandbox/streaming API and cleans up grouped containers itself,
    core/runtime/v2/shim_manager.go ``supportSandboxAPIVersion``, so we claim 3
    only if containerd's MAX_SHIM_VERSION says 3 — no release does yet.)

containerd 2.3 (pkg/shim/util.go ``Command``, api/runtime/bootstrap/v1/bootstrap.proto)
    flags and env as before, but stdin is a protobuf ``BootstrapParams``; the
    runtime options travel as one of its ``extensions``; ``socket_dir`` (set by
    2.3 to its configured or default directory) replaces /run/containerd/s.
    An old-style ``Any`` can also decode as ``BootstrapParams`` (fields 1 and 2
    are strings in both), so, like pkg/shim/compat.go ``parseBootstrapParams``
    on containerd main, stdin counts as BootstrapParams only when it decodes
    and its instance_id and namespace equal -id and -namespace (2.3.0–2.3.4
    Go shims took any stdin that decoded). Answer: a protobuf
    ``BootstrapResult`` (version, address, protocol "ttrpc"), which 2.3 decodes
    before trying JSON (core/runtime/v2/shim.go ``parseStartResponse``;
    2.3.0–2.3.4 binary.go trims whitespace off it first: it starts with 0x08
    and ends in "ttrpc", so trimming cannot hurt it). Its version follows the
    same rule as above: 2.3 still sends MAX_SHIM_VERSION=2, so 2.
"""

from __future__ import annotations

from shim.common.config import SOCKET_DIR
from shim.common.record import Factory, record
from shim.common.wire import RUNC_OPTIONS_TYPE, RUNTIME_OPTIONS_TYPE, Malformed, bytes_field, type_name, varint_field
from shim.common.wire import fields as _fields
from shim.common.wire import text as _text

from .grouping import shim_group

TYPE_CHECKING = False  # importing typing would cost the launcher ~3 ms
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from .flags import Flags

PROTOCOL = "ttrpc"
LOG_LEVEL_DEBUG = -4  # bootstrap.proto LogLevel; the Go shim logs debug at <= DEBUG
#: The highest task API version we will claim (containerd.task.v3.Task).
MAX_VERSION = 3


@record
class RawAny:
    """A ``google.protobuf.Any`` as bytes: type URL and serialized message."""

    type_url: str
    value: bytes

    @property
    def type_name(self) -> str:
        return type_name(self.type_url)


@record
class StartInput:
    """Everything containerd told the ``start`` action, whichever release it is."""

    instance_id: str
    namespace: str
    grpc_address: str  # containerd's gRPC socket: part of the socket hash
    ttrpc_address: str  # where events go
    containerd_binary: str  # -publish-binary
    debug: bool
    #: containerd's MAX_SHIM_VERSION (0 = not sent: containerd 1.6).
    max_shim_version: int = 0
    #: True when stdin was a BootstrapParams for this instance (containerd 2.3+).
    bootstrap: bool = False
    log_level: int = 0  # bootstrap LogLevel numbering (INFO 0, DEBUG -4)
    containerd_version: str = ""  # 2.3+ only
    socket_dir: str | None = None  # 2.3+: where to put the socket; None = default
    #: The runtime options (legacy stdin, or the bootstrap extension holding them).
    options_any: RawAny | None = None
    extensions: list[RawAny] = Factory(list)

    @property
    def version(self) -> int:
        """The task API version we answer with; 0 = plain address (1.6)."""
        if self.max_shim_version >= MAX_VERSION:
            return MAX_VERSION
        if self.max_shim_version >= 2 or self.bootstrap:
            return 2
        return 0

    @property
    def socket_directory(self) -> str:
        return self.socket_dir or SOCKET_DIR


# -- the protobuf wire format, just what these messages need --------------------


def decode_any(buf: bytes) -> RawAny:
    """google.protobuf.Any: type_url = 1 (string), value = 2 (bytes)."""
    type_url, value = "", b""
    for number, wire, v in _fields(buf):
        if wire != 2:
            continue  # a known field with another wire type is an unknown field
        if number == 1:
            type_url = _text(v)
        elif number == 2:
            value = bytes(v)
    return RawAny(type_url, value)


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


_PARAM_STRINGS = {
    1: "instance_id",
    2: "namespace",
    4: "containerd_version",
    5: "containerd_ttrpc_address",
    6: "containerd_grpc_address",
    7: "containerd_binary",
    9: "socket_dir",
}


def decode_bootstrap_params(buf: bytes) -> dict[str, Any]:
    """containerd.runtime.bootstrap.v1.BootstrapParams -> dict of its set fields;
    ``extensions`` is a list of RawAny. Raises Malformed where protobuf would."""
    out: dict[str, Any] = {"extensions": []}
    for number, wire, v in _fields(buf):
        if wire == 2 and number in _PARAM_STRINGS:
            out[_PARAM_STRINGS[number]] = _text(v)
        elif wire == 0 and number == 3 and isinstance(v, int):  # a varint is always an int
            out["log_level"] = _int32(v)
        elif wire == 2 and number == 8:
            # Extension { Any value = 1 }; repeated occurrences of a message field merge.
            any_bytes = b"".join(bytes(x) for n, w, x in _fields(bytes(v)) if n == 1 and w == 2)
            out["extensions"].append(decode_any(any_bytes))
    return out


def encode_bootstrap_result(version: int, address: str, protocol: str = PROTOCOL) -> bytes:
    """containerd.runtime.bootstrap.v1.BootstrapResult, as protobuf serializes it:
    version = 1 (int32), address = 2, protocol = 3; no capabilities, no metadata."""
    return varint_field(1, version) + bytes_field(2, address.encode()) + bytes_field(3, protocol.encode())


# -- the two entry points ---------------------------------------------------------


def _max_shim_version(env: Mapping[str, str]) -> int:
    try:
        return max(0, int(env.get("MAX_SHIM_VERSION", "").strip()))
    except ValueError:
        return 0


def _runtime_options(extensions: list[RawAny]) -> RawAny | None:
    """The runc options extension (what the Go shim's FindExtension looks up),
    else the first extension (CRI's runtimeoptions.v1.Options, say)."""
    for ext in extensions:
        if ext.type_name == RUNC_OPTIONS_TYPE:
            return ext
    return extensions[0] if extensions else None


@record
class LaunchSettings:
    """The runtime options ``start`` itself acts on."""

    shim_group: str = ""  # ShimGroup: "" / "pod" or "namespace"; decides the socket, so always read
    typed_cgroup: str = ""  # containerd.runc.v1.Options.shim_cgroup
    toml: str = ""  # a runtimeoptions.v1.Options TOML: ShimCgroup is parsed from it only when needed

    def shim_cgroup(self) -> str:
        """The cgroup a new shim joins (only a new shim needs it: tomllib costs ~20 ms to import)."""
        if self.typed_cgroup or not self.toml:
            return self.typed_cgroup
        from shim.common.errors import ShimError
        from shim.common.options import from_toml

        try:
            return from_toml(self.toml).shim_cgroup
        except ShimError:
            return ""


def launch_settings(options: RawAny | None) -> LaunchSettings:
    """ShimGroup (and what ShimCgroup needs) from the runtime options, without protobuf.

    containerd.runc.v1.Options has shim_cgroup (field 3) and no group; CRI's
    and ctr's runtimeoptions.v1.Options carry a TOML (``ShimCgroup``,
    ``ShimGroup``). This runs on every start, so the TOML is only scanned for
    the group (``grouping.shim_group``). Unreadable options are ignored, as the Go
    shim's start ignores them; an unknown ShimGroup is an error (ValueError),
    since guessing would put tasks in the wrong shim.
    """
    if options is None:
        return LaunchSettings()
    try:
        if options.type_name == RUNC_OPTIONS_TYPE:
            for number, wire, value in _fields(options.value):
                if number == 3 and wire == 2:
                    return LaunchSettings(typed_cgroup=_text(value))
        elif options.type_name == RUNTIME_OPTIONS_TYPE:
            from shim.common.errors import ShimError
            from shim.common.options import runtime_options_toml

            try:
                text = runtime_options_toml(options.value)
            except ShimError:
                return LaunchSettings()
            return LaunchSettings(shim_group=shim_group(text), toml=text)
    except Malformed:
        return LaunchSettings()
    return LaunchSettings()


def parse_start_input(stdin: bytes, flags: Flags, env: Mapping[str, str]) -> StartInput:
    """What containerd sent: flags, environment and stdin, of any release. Never raises
    for bad stdin: unreadable options are ignored, as the Go shims ignore them."""
    si = StartInput(
        instance_id=flags.id,
        namespace=flags.namespace,
        grpc_address=flags.address,
        ttrpc_address=env.get("TTRPC_ADDRESS", ""),
        containerd_binary=flags.publish_binary,
        debug=flags.debug,
        max_shim_version=_max_shim_version(env),
    )
    if not stdin:
        return si
    try:
        params = decode_bootstrap_params(stdin)
    except Malformed:
        params = None
    if (
        params is not None
        and params.get("instance_id", "") == flags.id
        and params.get("namespace", "") == flags.namespace
    ):
        si.bootstrap = True
        si.log_level = params.get("log_level", 0)
        si.debug = si.log_level <= LOG_LEVEL_DEBUG
        si.containerd_version = params.get("containerd_version", "")
        si.grpc_address = params.get("containerd_grpc_address") or si.grpc_address
        si.ttrpc_address = params.get("containerd_ttrpc_address") or si.ttrpc_address
        si.containerd_binary = params.get("containerd_binary") or si.containerd_binary
        si.socket_dir = params.get("socket_dir") or None
        si.extensions = params["extensions"]
        si.options_any = _runtime_options(si.extensions)
        return si
    try:
        si.options_any = decode_any(stdin)
    except Malformed:
        pass
    return si


def render_start_output(address: str, start_input: StartInput) -> bytes:
    """The bytes to print on stdout for ``address`` (``unix:///…``)."""
    version = start_input.version
    if start_input.bootstrap:
        return encode_bootstrap_result(version, address)
    if version >= 2:
        import json  # lazily: only 1.7+ get JSON (1.6 a plain address, 2.3 protobuf)

        # Go's encoding/json: struct field order, no spaces.
        return json.dumps(
            {"version": version, "address": address, "protocol": PROTOCOL}, separators=(",", ":")
        ).encode()
    return address.encode()
