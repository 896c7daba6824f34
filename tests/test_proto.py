"""The protobuf schema subset: checked-in modules are fresh, field numbers are containerd's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from shim.proto import (
    events_pb2,
    events_service_pb2,
    generate,
    mount_pb2,
    runc_options_pb2,
    runtimeoptions_pb2,
    shim_pb2,
    status_pb2,
    task_types_pb2,
    ttrpc_pb2,
)

PROTO_DIR = Path(generate.__file__).resolve().parent


# --- staleness ---------------------------------------------------------------


def _generated(directory: Path) -> dict[str, bytes]:
    """The modules and their type stubs (what mypy reads)."""
    return {p.name: p.read_bytes() for suffix in (".py", ".pyi") for p in directory.glob(f"*_pb2{suffix}")}


def test_checked_in_modules_match_generator(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = _generated(tmp_path / "shim" / "proto")
    checked_in = _generated(PROTO_DIR)
    assert sorted(fresh) == sorted(p.stem + "_pb2" + s for p in generate.proto_files() for s in (".py", ".pyi"))
    assert sorted(checked_in) == sorted(fresh), "run: python -m shim.proto.generate"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated modules {stale}; run: python -m shim.proto.generate"


def test_every_module_has_a_proto() -> None:
    for module in PROTO_DIR.glob("*_pb2.py"):
        assert (PROTO_DIR / (module.name[: -len("_pb2.py")] + ".proto")).is_file(), module.name


# --- hand-built wire bytes ----------------------------------------------------


def test_task_exit_wire_bytes() -> None:
    msg = events_pb2.TaskExit(
        container_id="c1",
        id="e1",
        pid=42,
        exit_status=137,
        exited_at=timestamp_pb2.Timestamp(seconds=1, nanos=2),
    )
    expected = (
        b"\x0a\x02c1"  # 1: container_id
        b"\x12\x02e1"  # 2: id
        b"\x18\x2a"  # 3: pid varint 42
        b"\x20\x89\x01"  # 4: exit_status varint 137
        b"\x2a\x04\x08\x01\x10\x02"  # 5: exited_at {seconds: 1, nanos: 2}
    )
    assert msg.SerializeToString() == expected
    assert events_pb2.TaskExit.FromString(expected) == msg


def test_ttrpc_request_timeout_is_field_4_varint() -> None:
    assert ttrpc_pb2.Request(timeout_nano=5).SerializeToString() == b"\x20\x05"
    req = ttrpc_pb2.Request(
        service="containerd.task.v2.Task",
        method="Wait",
        payload=b"\x0a\x01x",
        metadata=[ttrpc_pb2.KeyValue(key="k", value="v")],
    )
    assert ttrpc_pb2.Request.FromString(req.SerializeToString()) == req
    wire = req.SerializeToString()
    assert wire.startswith(b"\x0a\x17containerd.task.v2.Task\x12\x04Wait\x1a\x03\x0a\x01x")
    assert wire.endswith(b"\x2a\x06\x0a\x01k\x12\x01v")


def test_ttrpc_response_status() -> None:
    resp = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="nf"))
    assert resp.SerializeToString() == b"\x0a\x06\x08\x05\x12\x02nf"


def test_create_task_request_field_numbers() -> None:
    req = shim_pb2.CreateTaskRequest(rootfs=[mount_pb2.Mount(type="bind", options=["ro"])])
    assert req.SerializeToString() == b"\x1a\x0a\x0a\x04bind\x22\x02ro"
    assert shim_pb2.CreateTaskRequest(terminal=True).SerializeToString() == b"\x20\x01"
    opts = shim_pb2.CreateTaskRequest(options=any_pb2.Any(type_url="t"))
    assert opts.SerializeToString() == b"\x52\x03\x0a\x01t"  # field 10, LEN


def test_state_response_status_and_exec_id() -> None:
    resp = shim_pb2.StateResponse(status=task_types_pb2.STOPPED, exec_id="x")
    assert resp.SerializeToString() == b"\x20\x03\x5a\x01x"  # 4: enum, 11: string


def test_status_enum_numbers() -> None:
    assert dict(task_types_pb2.Status.items()) == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }


def test_runc_options_wire() -> None:
    opts = runc_options_pb2.Options(binary_name="crun", root="/r", systemd_cgroup=True)
    assert opts.SerializeToString() == b"\x32\x04crun\x3a\x02/r\x48\x01"
    ro = runtimeoptions_pb2.Options(type_url="u", config_path="p", config_body=b"\xff")
    assert ro.SerializeToString() == b"\x0a\x01u\x12\x01p\x1a\x01\xff"


def test_envelope_wire() -> None:
    env = events_service_pb2.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=3),
        namespace="k8s.io",
        topic="/tasks/oom",
        event=any_pb2.Any(type_url="containerd.events.TaskOOM", value=b"\x0a\x01c"),
    )
    fwd = events_service_pb2.ForwardRequest(envelope=env)
    wire = fwd.SerializeToString()
    assert wire[:1] == b"\x0a"
    assert env.SerializeToString().startswith(b"\x0a\x02\x08\x03\x12\x06k8s.io\x1a\x0a/tasks/oom\x22")


def test_bare_type_url_any_needs_manual_unpack() -> None:
    # containerd's typeurl (v1) writes bare type URLs such as "containerd.runc.v1.Options"
    # (no "type.googleapis.com/" prefix). Python's Any.Is/Unpack insist on a '/', so
    # callers must compare the name after the last '/' themselves and ParseFromString.
    a = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x32\x04crun")
    assert not a.Is(runc_options_pb2.Options.DESCRIPTOR)
    assert a.type_url.rpartition("/")[2] == runc_options_pb2.Options.DESCRIPTOR.full_name
    assert runc_options_pb2.Options.FromString(a.value).binary_name == "crun"


# --- names that appear on the wire -----------------------------------------------


@pytest.mark.parametrize(
    ("descriptor", "full_name"),
    [
        (events_pb2.TaskExit.DESCRIPTOR, "containerd.events.TaskExit"),
        (events_pb2.TaskOOM.DESCRIPTOR, "containerd.events.TaskOOM"),
        (events_service_pb2.Envelope.DESCRIPTOR, "containerd.services.events.ttrpc.v1.Envelope"),
        (mount_pb2.Mount.DESCRIPTOR, "containerd.types.Mount"),
        (task_types_pb2.ProcessInfo.DESCRIPTOR, "containerd.v1.types.ProcessInfo"),
        (shim_pb2.CreateTaskRequest.DESCRIPTOR, "containerd.task.v2.CreateTaskRequest"),
        (runc_options_pb2.Options.DESCRIPTOR, "containerd.runc.v1.Options"),
        (runc_options_pb2.ProcessDetails.DESCRIPTOR, "containerd.runc.v1.ProcessDetails"),
        (runtimeoptions_pb2.Options.DESCRIPTOR, "runtimeoptions.v1.Options"),
        (ttrpc_pb2.Request.DESCRIPTOR, "ttrpc.Request"),
        (status_pb2.Status.DESCRIPTOR, "google.rpc.Status"),
    ],
)
def test_full_names(descriptor, full_name: str) -> None:
    assert descriptor.full_name == full_name


def test_services() -> None:
    task = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert task.full_name == "containerd.task.v2.Task"
    assert [m.name for m in task.methods] == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
        "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
        "Shutdown",
    ]  # fmt: skip
    assert task.methods_by_name["Wait"].output_type is shim_pb2.WaitResponse.DESCRIPTOR
    assert task.methods_by_name["Kill"].output_type.full_name == "google.protobuf.Empty"
    events = events_service_pb2.DESCRIPTOR.services_by_name["Events"]
    assert events.full_name == "containerd.services.events.ttrpc.v1.Events"
    fwd = events.methods_by_name["Forward"]
    assert fwd.input_type is events_service_pb2.ForwardRequest.DESCRIPTOR
    assert fwd.output_type.full_name == "google.protobuf.Empty"


# --- cross-check against containerd's own .proto files, when present ------------

CONTAINERD = Path("/usr/share/gocode/src/github.com/containerd/containerd")

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT64: "int64",
}
_FIELD = re.compile(r"^\s*(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)")


def _parse(text: str) -> dict[str, dict[str, tuple[str, int, bool]]]:
    """Top-level messages -> {field: (type, number, repeated)} from a flat .proto."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", "", text)
    out: dict[str, dict[str, tuple[str, int, bool]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^message\s+(\w+)", line):
            current = out.setdefault(m.group(1), {})
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _FIELD.match(line)):
            rep, typ, name, num = m.groups()
            current[name] = (typ.split(".")[-1], int(num), bool(rep))
    return out


def _ours(module) -> dict[str, dict[str, tuple[str, int, bool]]]:
    out = {}
    for name, msg in module.DESCRIPTOR.message_types_by_name.items():
        fields = {}
        for f in msg.fields:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                k, v = f.message_type.fields
                typ = f"map<{_SCALARS[k.type]}, {_SCALARS[v.type]}>"
                fields[f.name] = (typ, f.number, False)
                continue
            if f.message_type is not None:
                typ = f.message_type.name
            elif f.enum_type is not None:
                typ = f.enum_type.name
            else:
                typ = _SCALARS[f.type]
            fields[f.name] = (typ, f.number, f.is_repeated)
        out[name] = fields
    return out


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (shim_pb2, "runtime/v2/task/shim.proto"),
        (mount_pb2, "api/types/mount.proto"),
        (task_types_pb2, "api/types/task/task.proto"),
        (events_pb2, "api/events/task.proto"),
        (events_service_pb2, "api/services/ttrpc/events/v1/events.proto"),
        (runc_options_pb2, "runtime/v2/runc/options/oci.proto"),
        (runtimeoptions_pb2, "pkg/runtimeoptions/v1/api.proto"),
    ],
)
def test_matches_containerd_source(module, source: str) -> None:
    path = CONTAINERD / source
    if not path.is_file():
        pytest.skip(f"{path} not present")
    theirs = _parse(path.read_text())
    ours = _ours(module)
    if module is runtimeoptions_pb2:  # config_body = 3 is newer than 1.6.20
        ours["Options"].pop("config_body")
    assert ours == theirs
