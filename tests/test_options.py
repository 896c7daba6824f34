"""shim.common.options and shim.daemon.service.options_from_any: decoding CreateTaskRequest.options and the bundle's options.json."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from shim.common.errors import InvalidArgument
from shim.common.options import (
    OPTIONS_FILE,
    RUNC_ROOT,
    RUNC_ROOT_FILE,
    RUNTIME_FILE,
    RuncOptions,
)
from shim.common.wire import RUNC_OPTIONS_TYPE, type_name
from shim.daemon.service import options_from_any as from_any
from shim.proto import runc_options_pb2, runtimeoptions_pb2

FULL = RuncOptions(
    binary_name="/usr/bin/crun",
    root="/run/custom-runc",
    systemd_cgroup=True,
    no_pivot_root=True,
    no_new_keyring=True,
    shim_cgroup="/shim.slice",
    io_uid=1000,
    io_gid=1001,
    criu_path="/usr/sbin/criu",
    criu_image_path="/images",
)


def encoded() -> bytes:
    return runc_options_pb2.Options(
        binary_name="/usr/bin/crun",
        root="/run/custom-runc",
        systemd_cgroup=True,
        no_pivot_root=True,
        no_new_keyring=True,
        shim_cgroup="/shim.slice",
        io_uid=1000,
        io_gid=1001,
        criu_path="/usr/sbin/criu",
        criu_image_path="/images",
    ).SerializeToString()


def test_type_name_constant() -> None:
    assert RUNC_OPTIONS_TYPE == runc_options_pb2.Options.DESCRIPTOR.full_name == "containerd.runc.v1.Options"


@pytest.mark.parametrize(
    "type_url",
    ["containerd.runc.v1.Options", "type.googleapis.com/containerd.runc.v1.Options"],
)
def test_from_any_decodes_runc_options(type_url: str) -> None:
    assert from_any(type_url, encoded()) == FULL


def test_from_any_empty_value_is_defaults() -> None:
    assert from_any(RUNC_OPTIONS_TYPE, b"") == RuncOptions()


@pytest.mark.parametrize(
    "type_url",
    ["", "containerd.runc.v2.Options", "io.containerd.something.Else"],
)
def test_from_any_unknown_type_is_defaults(type_url: str) -> None:
    assert from_any(type_url, encoded()) == RuncOptions()
    assert from_any(type_url, b"\xff\xff not a proto") == RuncOptions()


def test_type_name() -> None:
    assert type_name("a.b.C") == "a.b.C"
    assert type_name("type.googleapis.com/a.b.C") == "a.b.C"


def test_defaults() -> None:
    opts = RuncOptions()
    assert opts.binary == "runc"
    assert opts.runc_root("default") == f"{RUNC_ROOT}/default" == "/run/containerd/runc/default"


def test_binary_and_runc_root() -> None:
    assert FULL.binary == "/usr/bin/crun"
    assert FULL.runc_root("k8s.io") == "/run/custom-runc/k8s.io"


def test_write_read_round_trip(tmp_path: Path) -> None:
    FULL.write(str(tmp_path), "k8s.io")
    assert RuncOptions.read(str(tmp_path)) == FULL
    assert (tmp_path / RUNTIME_FILE).read_text() == "/usr/bin/crun"
    assert (tmp_path / RUNC_ROOT_FILE).read_text() == "/run/custom-runc/k8s.io"
    assert json.loads((tmp_path / OPTIONS_FILE).read_text())["io_uid"] == 1000
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OPTIONS_FILE, RUNTIME_FILE, RUNC_ROOT_FILE])


def test_bundle_files_are_private_as_the_go_shims(tmp_path: Path) -> None:
    """options.json, runtime, runc-root: 0600 like the Go shim's, whatever the umask or an old file."""
    (tmp_path / OPTIONS_FILE).write_text("{}")
    (tmp_path / OPTIONS_FILE).chmod(0o666)
    old = os.umask(0)
    try:
        FULL.write(str(tmp_path), "k8s.io")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in (OPTIONS_FILE, RUNTIME_FILE, RUNC_ROOT_FILE)}
    assert modes == {OPTIONS_FILE: 0o600, RUNTIME_FILE: 0o600, RUNC_ROOT_FILE: 0o600}


def test_write_defaults_runtime_is_runc(tmp_path: Path) -> None:
    RuncOptions().write(str(tmp_path), "default")
    assert (tmp_path / RUNTIME_FILE).read_text() == "runc"
    assert RuncOptions.read(str(tmp_path)) == RuncOptions()


def test_read_missing_or_corrupt_is_defaults(tmp_path: Path) -> None:
    assert RuncOptions.read(str(tmp_path)) == RuncOptions()
    (tmp_path / OPTIONS_FILE).write_text("{not json")
    assert RuncOptions.read(str(tmp_path)) == RuncOptions()


def test_read_ignores_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / OPTIONS_FILE).write_text(json.dumps({"binary_name": "crun", "from_the_future": 1}))
    assert RuncOptions.read(str(tmp_path)) == RuncOptions(binary_name="crun")


@pytest.mark.parametrize("text", ["null", "[]"])
def test_read_non_object_json_is_defaults(tmp_path: Path, text: str) -> None:
    (tmp_path / OPTIONS_FILE).write_text(text)
    assert RuncOptions.read(str(tmp_path)) == RuncOptions()


RUNTIME_OPTIONS_TOML = """
BinaryName = "/usr/bin/crun"
SystemdCgroup = true
Root = "/run/custom-runc"
IoUid = 7
SomethingNewer = "ignored"
"""


@pytest.mark.parametrize("type_url", ["runtimeoptions.v1.Options", "type.googleapis.com/runtimeoptions.v1.Options"])
def test_cri_runtime_options_config_body_is_toml(type_url: str) -> None:
    value = runtimeoptions_pb2.Options(type_url="x", config_body=RUNTIME_OPTIONS_TOML.encode()).SerializeToString()
    assert from_any(type_url, value) == RuncOptions(
        binary_name="/usr/bin/crun", systemd_cgroup=True, root="/run/custom-runc", io_uid=7
    )


def test_cri_runtime_options_config_path(tmp_path: Path) -> None:
    path = tmp_path / "runc.toml"
    path.write_text('binary_name = "crun"\nno_pivot_root = true\n')
    value = runtimeoptions_pb2.Options(config_path=str(path)).SerializeToString()
    assert from_any("runtimeoptions.v1.Options", value) == RuncOptions(binary_name="crun", no_pivot_root=True)


def test_cri_runtime_options_errors_are_invalid_argument(tmp_path: Path) -> None:
    missing = runtimeoptions_pb2.Options(config_path=str(tmp_path / "nope.toml")).SerializeToString()
    with pytest.raises(InvalidArgument):
        from_any("runtimeoptions.v1.Options", missing)
    bad = runtimeoptions_pb2.Options(config_body=b"BinaryName = [").SerializeToString()
    with pytest.raises(InvalidArgument):
        from_any("runtimeoptions.v1.Options", bad)
    wrong_type = runtimeoptions_pb2.Options(config_body=b"SystemdCgroup = 'yes'").SerializeToString()
    with pytest.raises(InvalidArgument):
        from_any("runtimeoptions.v1.Options", wrong_type)


def test_cri_runtime_options_empty_is_defaults() -> None:
    assert from_any("runtimeoptions.v1.Options", b"") == RuncOptions()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08"])
def test_corrupt_runc_options_are_invalid_argument(garbage: bytes) -> None:
    """Not a traceback and an Unknown answer (issue 11 item 9): the caller sent bad bytes."""
    with pytest.raises(InvalidArgument, match=r"containerd\.runc\.v1\.Options"):
        from_any(RUNC_OPTIONS_TYPE, garbage)
