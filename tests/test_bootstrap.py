"""shim.launch.bootstrap: what each containerd release sends to ``start`` and what we answer.

Pure: no sockets, no processes. Each release's invocation is rebuilt the way
its ``Command`` builds it (sources named per fixture, containerd/containerd at
the tag given); ``integration/test_bootstrap_start.py`` runs the same against
the real executable.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from shim.common.config import SOCKET_DIR
from shim.launch import bootstrap
from shim.launch.bootstrap import (
    Malformed,
    RawAny,
    decode_any,
    decode_bootstrap_params,
    encode_bootstrap_result,
    parse_start_input,
    render_start_output,
)
from shim.launch.cli import parse_args
from shim.launch.grouping import socket_path
from shim.proto import bootstrap_pb2, runc_options_pb2, runtimeoptions_pb2

NS = "k8s.io"
CID = "4f2a9c0e7d1b"
GRPC = "/run/containerd/containerd.sock"
TTRPC = "/run/containerd/containerd.sock.ttrpc"
CONTAINERD_BIN = "/usr/bin/containerd"
ADDRESS = "unix://" + socket_path(GRPC, NS, CID)

RUNC_OPTS = any_pb2.Any(
    type_url="containerd.runc.v1.Options",
    value=runc_options_pb2.Options(binary_name="crun", systemd_cgroup=True).SerializeToString(),
)
CRI_OPTS = any_pb2.Any(
    type_url="runtimeoptions.v1.Options",
    value=runtimeoptions_pb2.Options(config_path="/etc/crun.toml").SerializeToString(),
)


# -- each release's invocation -------------------------------------------------------


def argv(debug: bool = False) -> list[str]:
    """Flags of every release: 1.6.20 runtime/v2/shim/util.go Command (-namespace,
    -address, -publish-binary) + runtime/v2/binary.go Start (-id, [-debug], start);
    1.7/2.0-2.2 the same; 2.3 pkg/shim/util.go Command (same flags, same order)."""
    args = ["-namespace", NS, "-address", GRPC, "-publish-binary", CONTAINERD_BIN, "-id", CID]
    return args + (["-debug"] if debug else []) + ["start"]


ENV_16 = {"GOMAXPROCS": "2", "TTRPC_ADDRESS": TTRPC}  # v1.6.20 runtime/v2/shim/util.go
ENV_17 = {  # v1.7.0 runtime/v2/shim/util.go; v2.0.0-v2.3.x pkg/shim/util.go: identical
    "GOMAXPROCS": "2",
    "MAX_SHIM_VERSION": "2",
    "TTRPC_ADDRESS": TTRPC,
    "GRPC_ADDRESS": GRPC,
    "NAMESPACE": NS,
}


def bootstrap_params(**overrides) -> bootstrap_pb2.BootstrapParams:
    """What containerd v2.3.0 pkg/shim/util.go Command writes on stdin for `start`."""
    fields = dict(
        instance_id=CID,
        namespace=NS,
        log_level=bootstrap_pb2.LOG_LEVEL_INFO,
        containerd_version="2.3.0",
        containerd_grpc_address=GRPC,
        containerd_ttrpc_address=TTRPC,
        containerd_binary=CONTAINERD_BIN,
        extensions=[bootstrap_pb2.Extension(value=RUNC_OPTS)],
        socket_dir=SOCKET_DIR,  # 2.3 always sets it (shim_manager.go defaultSocketDir)
    )
    fields.update(overrides)
    return bootstrap_pb2.BootstrapParams(**fields)


def start_input(stdin: bytes, env: dict[str, str], debug: bool = False):
    return parse_start_input(stdin, parse_args(argv(debug)), env)


# -- the schema ---------------------------------------------------------------------

# containerd v2.3.0 api/runtime/bootstrap/v1/bootstrap.proto: (name, number, type, repeated, optional)
CONTAINERD_BOOTSTRAP_PROTO = {
    "BootstrapParams": [
        ("instance_id", 1, "string", False, False),
        ("namespace", 2, "string", False, False),
        ("log_level", 3, "LogLevel", False, False),
        ("containerd_version", 4, "string", False, False),
        ("containerd_ttrpc_address", 5, "string", False, False),
        ("containerd_grpc_address", 6, "string", False, False),
        ("containerd_binary", 7, "string", False, False),
        ("extensions", 8, "Extension", True, False),
        ("socket_dir", 9, "string", False, True),
    ],
    "Extension": [("value", 1, "Any", False, False)],
    "BootstrapResult": [
        ("version", 1, "int32", False, False),
        ("address", 2, "string", False, False),
        ("protocol", 3, "string", False, False),
        ("capabilities", 4, "Capability", True, False),
        ("metadata", 5, "MetadataEntry", True, False),
    ],
}
_TYPES = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_INT32: "int32"}


def test_proto_matches_containerd_2_3() -> None:
    assert bootstrap_pb2.DESCRIPTOR.package == "containerd.runtime.bootstrap.v1"
    for message, expected in CONTAINERD_BOOTSTRAP_PROTO.items():
        desc = bootstrap_pb2.DESCRIPTOR.message_types_by_name[message]
        ours = [
            (
                f.name,
                f.number,
                (f.message_type or f.enum_type).name if (f.message_type or f.enum_type) else _TYPES[f.type],
                f.is_repeated,
                f.has_presence and f.containing_oneof is not None,
            )
            for f in desc.fields
        ]
        assert ours == expected, message
    assert dict(bootstrap_pb2.LogLevel.items()) == {
        "LOG_LEVEL_INFO": 0,
        "LOG_LEVEL_TRACE": -8,
        "LOG_LEVEL_DEBUG": -4,
        "LOG_LEVEL_WARN": 4,
        "LOG_LEVEL_ERROR": 8,
        "LOG_LEVEL_FATAL": 10,
        "LOG_LEVEL_PANIC": 12,
    }
    assert bootstrap.LOG_LEVEL_DEBUG == bootstrap_pb2.LOG_LEVEL_DEBUG


# -- each release: stdin -> parse -> output bytes -------------------------------------


@pytest.mark.parametrize("stdin", [RUNC_OPTS.SerializeToString(), b""], ids=["options", "no-options"])
def test_containerd_1_6_gets_the_plain_address(stdin: bytes) -> None:
    si = start_input(stdin, ENV_16)
    assert (si.bootstrap, si.max_shim_version, si.version) == (False, 0, 0)
    assert si.ttrpc_address == TTRPC and si.grpc_address == GRPC and si.socket_directory == SOCKET_DIR
    assert si.options_any == (RawAny(RUNC_OPTS.type_url, RUNC_OPTS.value) if stdin else None)
    out = render_start_output(ADDRESS, si)
    assert out == ADDRESS.encode()
    assert out.strip() == out  # 1.6 binary.go: strings.TrimSpace(CombinedOutput)


@pytest.mark.parametrize("release", ["1.7", "2.0-2.2"])
def test_containerd_1_7_and_2_x_get_json_version_2(release: str) -> None:
    si = start_input(RUNC_OPTS.SerializeToString(), ENV_17, debug=True)
    assert (si.bootstrap, si.max_shim_version, si.version, si.debug) == (False, 2, 2, True)
    assert si.options_any.type_name == "containerd.runc.v1.Options"
    out = render_start_output(ADDRESS, si)
    assert out == b'{"version":2,"address":"' + ADDRESS.encode() + b'","protocol":"ttrpc"}'
    # runtime/v2/shim.go (1.7) and core/runtime/v2/shim.go (2.x) parseStartResponse
    assert json.loads(out) == {"version": 2, "address": ADDRESS, "protocol": "ttrpc"}


def test_a_2_3_daemon_would_not_mistake_a_json_answer_for_protobuf() -> None:
    # 2.3 tries proto.Unmarshal(BootstrapResult) before JSON; the JSON must fail it.
    for version in (2, 3):
        si = start_input(b"", {**ENV_17, "MAX_SHIM_VERSION": str(version)})
        out = render_start_output(ADDRESS, si)
        with pytest.raises(DecodeError):
            bootstrap_pb2.BootstrapResult.FromString(out)
        with pytest.raises(Malformed):
            bootstrap._fields(out)  # Go's rules: unterminated group 15 ('{')
    with pytest.raises(Malformed):
        bootstrap._fields(ADDRESS.encode())


def test_containerd_2_3_gets_a_bootstrap_result() -> None:
    stdin = bootstrap_params(socket_dir="/run/ctrd-x/s").SerializeToString()
    si = start_input(stdin, ENV_17)
    assert si.bootstrap and si.version == 2 and not si.debug
    assert si.containerd_version == "2.3.0"
    assert si.socket_dir == "/run/ctrd-x/s" and si.socket_directory == "/run/ctrd-x/s"
    assert si.options_any == RawAny("containerd.runc.v1.Options", RUNC_OPTS.value)
    address = "unix://" + socket_path(si.grpc_address, si.namespace, si.instance_id, si.socket_directory)
    assert address.startswith("unix:///run/ctrd-x/s/")
    out = render_start_output(address, si)
    assert out == b"\x08\x02\x12" + bytes([len(address)]) + address.encode() + b"\x1a\x05ttrpc"
    assert bootstrap_pb2.BootstrapResult.FromString(out) == bootstrap_pb2.BootstrapResult(
        version=2, address=address, protocol="ttrpc"
    )
    # 2.3.0-2.3.4 binary.go bytes.TrimSpace the output before decoding it.
    assert out.strip(b" \t\n\v\f\r") == out and out[:1] not in (b"\xc2", b"\x85", b"\xa0")


def test_containerd_2_3_golden_bytes() -> None:
    """Hand-encoded from bootstrap.proto's field numbers, independent of our .proto."""
    any_bytes = b"\x0a\x1acontainerd.runc.v1.Options" + b"\x12\x06\x32\x04crun"
    stdin = (
        b"\x0a" + bytes([len(CID)]) + CID.encode()  # 1 instance_id
        + b"\x12\x06k8s.io"  # 2 namespace
        + b"\x18" + b"\xf8" + b"\xff" * 8 + b"\x01"  # 3 log_level = TRACE (-8), 10-byte varint
        + b"\x22\x05" + b"2.3.0"  # 4 containerd_version
        + b"\x2a" + bytes([len(TTRPC)]) + TTRPC.encode()  # 5 ttrpc address
        + b"\x32" + bytes([len(GRPC)]) + GRPC.encode()  # 6 grpc address
        + b"\x3a\x13/usr/bin/containerd"  # 7 binary
        + b"\x42" + bytes([len(any_bytes) + 2, 0x0A, len(any_bytes)]) + any_bytes  # 8 Extension{1: Any}
        + b"\x4a\x07/tmp/sd"  # 9 socket_dir
    )  # fmt: skip
    assert bootstrap_pb2.BootstrapParams.FromString(stdin).log_level == bootstrap_pb2.LOG_LEVEL_TRACE
    si = start_input(stdin, ENV_17)
    assert si.bootstrap and si.debug and si.log_level == -8
    assert (si.ttrpc_address, si.grpc_address, si.containerd_binary) == (TTRPC, GRPC, CONTAINERD_BIN)
    assert si.socket_dir == "/tmp/sd"
    assert si.options_any == RawAny("containerd.runc.v1.Options", b"\x32\x04crun")
    assert render_start_output("unix:///tmp/sd/ab", si) == b"\x08\x02\x12\x11unix:///tmp/sd/ab\x1a\x05ttrpc"


def test_bootstrap_values_win_over_flags_and_env() -> None:
    """The Go shim (2.3 manager_linux.go Start) uses only BootstrapParams' values."""
    stdin = bootstrap_params(
        containerd_ttrpc_address="/other.ttrpc", containerd_binary="/opt/containerd", log_level=-4
    ).SerializeToString()
    si = start_input(stdin, {**ENV_17, "TTRPC_ADDRESS": "/env.ttrpc"})
    assert (si.ttrpc_address, si.containerd_binary, si.debug) == ("/other.ttrpc", "/opt/containerd", True)
    unset = bootstrap_pb2.BootstrapParams(instance_id=CID, namespace=NS).SerializeToString()
    si = start_input(unset, ENV_17)
    assert si.bootstrap and si.socket_dir is None and si.socket_directory == SOCKET_DIR
    assert (si.ttrpc_address, si.grpc_address, si.options_any) == (TTRPC, GRPC, None)


@pytest.mark.parametrize(
    ("env", "stdin", "expected"),
    [
        ({**ENV_17, "MAX_SHIM_VERSION": "3"}, b"", "json"),
        ({**ENV_17, "MAX_SHIM_VERSION": "7"}, b"", "json"),
        ({**ENV_17, "MAX_SHIM_VERSION": "3"}, bootstrap_params().SerializeToString(), "proto"),
    ],
)
def test_version_3_only_when_containerd_offers_it(env, stdin, expected) -> None:
    si = start_input(stdin, env)
    assert si.version == 3
    out = render_start_output(ADDRESS, si)
    if expected == "json":
        assert out == b'{"version":3,"address":"' + ADDRESS.encode() + b'","protocol":"ttrpc"}'
    else:
        assert bootstrap_pb2.BootstrapResult.FromString(out).version == 3


@pytest.mark.parametrize("value", ["", "1", "two", "-3", " 2 "])
def test_max_shim_version_below_2_or_garbage(value: str) -> None:
    si = start_input(b"", {**ENV_16, "MAX_SHIM_VERSION": value})
    assert si.version == (2 if value.strip() == "2" else 0)


# -- 2.3 detection ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [{"instance_id": "someone-else"}, {"namespace": "default"}, {"instance_id": ""}]
)
def test_bootstrap_params_for_another_instance_is_a_legacy_any(overrides) -> None:
    stdin = bootstrap_params(**overrides).SerializeToString()
    si = start_input(stdin, ENV_17)
    assert not si.bootstrap and si.version == 2 and si.socket_dir is None
    # read as an Any, as a pre-2.3 shim would: type_url = field 1, value = field 2
    params = bootstrap_params(**overrides)
    assert si.options_any == RawAny(params.instance_id, params.namespace.encode())
    assert render_start_output(ADDRESS, si).startswith(b'{"version":2,')


def test_legacy_options_that_also_parse_as_bootstrap_params_stay_legacy() -> None:
    stdin = RUNC_OPTS.SerializeToString()
    lookalike = bootstrap_pb2.BootstrapParams.FromString(stdin)  # valid UTF-8 value: it decodes
    assert lookalike.instance_id == "containerd.runc.v1.Options"
    si = start_input(stdin, ENV_17)
    assert not si.bootstrap and si.options_any.type_name == "containerd.runc.v1.Options"


def test_runtime_options_extension_is_found_by_type() -> None:
    stdin = bootstrap_params(
        extensions=[bootstrap_pb2.Extension(value=CRI_OPTS), bootstrap_pb2.Extension(value=RUNC_OPTS)]
    ).SerializeToString()
    si = start_input(stdin, ENV_17)
    assert [e.type_name for e in si.extensions] == ["runtimeoptions.v1.Options", "containerd.runc.v1.Options"]
    assert si.options_any.type_name == "containerd.runc.v1.Options"
    only_cri = bootstrap_params(extensions=[bootstrap_pb2.Extension(value=CRI_OPTS)]).SerializeToString()
    assert start_input(only_cri, ENV_17).options_any == RawAny(CRI_OPTS.type_url, CRI_OPTS.value)


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "stdin",
    [
        b"\xff",
        b"\x0a\x05ab",  # truncated
        b"\x0a\x02\xff\xfe",  # field 1 not UTF-8
        b"\x0b\x0a\x00",  # unterminated group
        b"\x0c",  # end group outside a group
        b"\x0b" * 5000,  # deep groups
        b"\x00",  # field number 0
        b"\x0f",  # wire type 7
        b"\x18" + b"\xff" * 9 + b"\x02",  # varint overflowing 64 bits (Go protowire: error)
        b"\x18" + b"\xff" * 11,  # over-long varint
        b"hello, world\n",
        bytes(range(256)),
    ],
)
def test_garbage_stdin_is_ignored(stdin: bytes) -> None:
    for env in (ENV_16, ENV_17):
        si = start_input(stdin, env)
        assert not si.bootstrap and si.socket_dir is None
        assert render_start_output(ADDRESS, si) in (ADDRESS.encode(), render_start_output(ADDRESS, start_input(b"", env)))


def test_random_garbage_never_raises() -> None:
    rnd = random.Random(12786)
    for _ in range(3000):
        stdin = rnd.randbytes(rnd.randrange(1, 64))
        si = start_input(stdin, ENV_17)
        render_start_output(ADDRESS, si)


def test_hand_decoder_agrees_with_protobuf() -> None:
    """Whatever the hand decoder accepts, protobuf decodes to the same values;
    whatever protobuf rejects, so does the hand decoder (it is as strict as Go's
    protowire, e.g. on 10-byte varints, where upb is laxer)."""
    base = bootstrap_params(log_level=-4, extensions=[bootstrap_pb2.Extension(value=CRI_OPTS)]).SerializeToString()
    rnd = random.Random(9)
    for i in range(5000):
        buf = bytearray(base)
        for _ in range(rnd.randrange(1, 4)):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        if i % 3 == 0:
            del buf[rnd.randrange(len(buf)) :]
        buf = bytes(buf)
        try:
            mine = decode_bootstrap_params(buf)
        except Malformed:
            continue
        theirs = bootstrap_pb2.BootstrapParams.FromString(buf)  # must not raise
        assert mine.get("instance_id", "") == theirs.instance_id
        assert mine.get("namespace", "") == theirs.namespace
        assert mine.get("log_level", 0) == theirs.log_level
        assert mine.get("socket_dir") == (theirs.socket_dir if theirs.HasField("socket_dir") else None)
        assert mine["extensions"] == [RawAny(e.value.type_url, e.value.value) for e in theirs.extensions]


def test_decode_any_of_empty_and_unknown_fields() -> None:
    assert decode_any(b"") == RawAny("", b"")
    assert decode_any(b"\x08\x01\x0a\x01t\x1a\x00\x12\x01v") == RawAny("t", b"v")


@pytest.mark.parametrize("version", [0, 2, 3, 300])
@pytest.mark.parametrize("address", ["unix:///s/x", "unix:///" + "a" * 200, ""])
def test_hand_encoder_matches_protobuf(version: int, address: str) -> None:
    expected = bootstrap_pb2.BootstrapResult(version=version, address=address, protocol="ttrpc")
    assert encode_bootstrap_result(version, address) == expected.SerializeToString()


def test_socket_path_takes_a_directory() -> None:
    digest = hashlib.sha256(f"{GRPC}/{NS}/{CID}".encode()).hexdigest()
    assert socket_path(GRPC, NS, CID) == f"{SOCKET_DIR}/{digest}"
    assert socket_path(GRPC, NS, CID, "/tmp/sd") == f"/tmp/sd/{digest}"


HEAVY = ("google", "trio", "typing", "dataclasses", "json", "subprocess", "inspect", "signal")


@pytest.mark.parametrize("entry, allowed", [("shim.launch.launcher", ()), ("shim.launch.cleanup", ())])
def test_start_and_delete_paths_stay_lean(entry: str, allowed: tuple[str, ...]) -> None:
    """Each of these runs in a fresh interpreter per container: no heavy imports.

    (delete parses the bundle's options.json only when runc may still hold the container.)
    """
    import subprocess
    import sys

    heavy = tuple(m for m in HEAVY if m not in allowed)
    probe = f"import sys, shim.launch.cli, {entry}; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wire_delete_response_matches_protobuf() -> None:
    from shim.common import wire
    from shim.proto import shim_pb2

    for pid, status, ns in [(0, 0, 0), (1234, 137, 1_764_000_000_123_456_789), (2**31, 255, 5)]:
        expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
        if ns:
            expected.exited_at.FromNanoseconds(ns)
        assert wire.delete_response(pid, status, ns) == expected.SerializeToString()
