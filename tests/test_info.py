"""shim.launch.info: the ``-info`` answer, decoded with the generated RuntimeInfo module."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim import __version__
from shim.launch.bootstrap import RawAny
from shim.launch.cli import parse_args
from shim.launch.info import (
    FEATURES_TYPE,
    RUNTIME_NAME,
    InfoError,
    binary_name,
    encode_runtime_info,
    look_path,
    runtime_info,
)
from shim.proto import introspection_pb2, runc_options_pb2, runtimeoptions_pb2

RUNC_TYPE = "containerd.runc.v1.Options"
RUNTIMEOPTIONS_TYPE = "runtimeoptions.v1.Options"


def runc_any(**fields: object) -> any_pb2.Any:
    return any_pb2.Any(type_url=RUNC_TYPE, value=runc_options_pb2.Options(**fields).SerializeToString())


def raw(message: any_pb2.Any) -> RawAny:
    return RawAny(message.type_url, message.value)


def test_info_flag_parses_with_containerds_leading_flags() -> None:
    flags = parse_args(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/bin/c", "-id", "x", "-info"])
    assert flags.info and flags.action == "" and flags.id == "x"
    assert not parse_args(["start"]).info


def test_encoded_runtime_info_decodes_with_every_field() -> None:
    options = runc_any(binary_name="crun", root="/r")
    features = b'{"ociVersionMin":"1.0.0","hooks":["prestart"]}'
    info = introspection_pb2.RuntimeInfo.FromString(encode_runtime_info(raw(options), features))
    assert info.name == RUNTIME_NAME
    assert info.version.version == __version__
    assert info.options.type_url == RUNC_TYPE
    assert runc_options_pb2.Options.FromString(info.options.value).binary_name == "crun"
    assert info.features.type_url == FEATURES_TYPE
    assert json.loads(info.features.value) == {"ociVersionMin": "1.0.0", "hooks": ["prestart"]}


def test_no_options_and_no_features_leave_those_fields_unset() -> None:
    info = introspection_pb2.RuntimeInfo.FromString(encode_runtime_info(None, None))
    assert info.name == RUNTIME_NAME
    assert not info.HasField("options") and not info.HasField("features")


def test_binary_name_from_typed_options_toml_or_default(tmp_path: Path) -> None:
    assert binary_name(None) == "runc"
    assert binary_name(raw(runc_any())) == "runc"
    assert binary_name(raw(runc_any(binary_name="/opt/crun"))) == "/opt/crun"
    body = runtimeoptions_pb2.Options(type_url=RUNC_TYPE, config_body=b'BinaryName = "crun"\n')
    assert binary_name(RawAny(RUNTIMEOPTIONS_TYPE, body.SerializeToString())) == "crun"
    toml = tmp_path / "runc.toml"
    toml.write_text('binary_name = "youki"\n')
    by_path = runtimeoptions_pb2.Options(config_path=str(toml))
    assert binary_name(RawAny(RUNTIMEOPTIONS_TYPE, by_path.SerializeToString())) == "youki"
    broken = runtimeoptions_pb2.Options(config_body=b"BinaryName = \n")
    with pytest.raises(InfoError, match="TOML"):
        binary_name(RawAny(RUNTIMEOPTIONS_TYPE, broken.SerializeToString()))


def _fake_runtime(directory: Path, name: str, script: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_look_path_searches_path_and_takes_slashed_names_as_they_are(tmp_path: Path) -> None:
    runtime = _fake_runtime(tmp_path, "myrt", "exit 0\n")
    assert look_path("myrt", path=f"/nonexistent{os.pathsep}{tmp_path}") == str(runtime)
    assert look_path(str(runtime)) == str(runtime)
    with pytest.raises(InfoError, match="not found"):
        look_path("myrt", path="/nonexistent")
    with pytest.raises(InfoError, match="not an executable"):
        look_path(str(tmp_path / "missing"))


def test_runtime_info_carries_the_runtimes_features_json(tmp_path: Path) -> None:
    runtime = _fake_runtime(tmp_path, "rt", """[ "$1" = features ] && echo '{"ociVersionMax": "1.2.0"}'\n""")
    options = runc_any(binary_name=str(runtime))
    info = introspection_pb2.RuntimeInfo.FromString(runtime_info(options.SerializeToString()))
    assert json.loads(info.features.value) == {"ociVersionMax": "1.2.0"}
    assert info.options == options


def test_runtime_without_a_features_command_still_answers(tmp_path: Path) -> None:
    """crun 1.8: 'unknown command features' -> no features, like the Go shim (it only logs)."""
    runtime = _fake_runtime(tmp_path, "rt", "echo 'unknown command features' >&2; exit 1\n")
    info = introspection_pb2.RuntimeInfo.FromString(runtime_info(runc_any(binary_name=str(runtime)).SerializeToString()))
    assert info.name == RUNTIME_NAME and not info.HasField("features")


def test_missing_runtime_binary_is_an_error() -> None:
    with pytest.raises(InfoError, match="no-such-runtime"):
        runtime_info(runc_any(binary_name="no-such-runtime-xyz").SerializeToString())
