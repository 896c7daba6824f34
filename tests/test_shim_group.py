"""ShimGroup: the runtime option that picks which tasks one shim serves (start's side)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.bootstrap import LaunchSettings, RawAny, launch_settings
from shim.bundle import NAMESPACE_GROUP, group_id
from shim.proto import runc_options_pb2, runtimeoptions_pb2

RUNTIMEOPTIONS = "runtimeoptions.v1.Options"


def toml_options(body: str) -> RawAny:
    return RawAny(RUNTIMEOPTIONS, runtimeoptions_pb2.Options(config_body=body.encode()).SerializeToString())


def bundle_with(bundle: Path, annotations: dict[str, str] | None) -> str:
    bundle.mkdir()
    spec: dict = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))
    return str(bundle)


def test_settings_from_toml_by_path_and_body(tmp_path: Path) -> None:
    assert launch_settings(toml_options('ShimGroup = "namespace"\nShimCgroup = "/shims"\n')) == LaunchSettings(
        shim_cgroup="/shims", shim_group="namespace")
    path = tmp_path / "runc.toml"
    path.write_text('shim_group = "pod"\n')
    by_path = RawAny(RUNTIMEOPTIONS, runtimeoptions_pb2.Options(config_path=str(path)).SerializeToString())
    assert launch_settings(by_path).shim_group == "pod"


def test_typed_runc_options_have_no_group_and_keep_their_cgroup() -> None:
    typed = RawAny("containerd.runc.v1.Options", runc_options_pb2.Options(shim_cgroup="/x").SerializeToString())
    assert launch_settings(typed) == LaunchSettings(shim_cgroup="/x")
    assert launch_settings(None) == LaunchSettings()


def test_unknown_group_is_refused_and_unreadable_options_are_ignored() -> None:
    with pytest.raises(ValueError, match="ShimGroup 'node'"):
        launch_settings(toml_options('ShimGroup = "node"\n'))
    assert launch_settings(toml_options("ShimGroup = \n")) == LaunchSettings()  # broken TOML: like Go, ignored


def test_namespace_mode_groups_everything_but_an_explicit_group(tmp_path: Path) -> None:
    plain = bundle_with(tmp_path / "a", None)
    assert group_id(plain, "task-a", namespace_mode=True) == NAMESPACE_GROUP
    assert group_id(plain, "task-a") == "task-a"
    pod = bundle_with(tmp_path / "pod", {"io.kubernetes.cri.sandbox-id": "sandbox1"})
    assert group_id(pod, "c1") == "sandbox1"
    assert group_id(pod, "c1", namespace_mode=True) == NAMESPACE_GROUP  # pods share the namespace's shim
    explicit = bundle_with(tmp_path / "explicit", {"io.containerd.runc.v2.group": "mine",
                                                   "io.kubernetes.cri.sandbox-id": "sandbox1"})
    assert group_id(explicit, "c2", namespace_mode=True) == "mine"
    empty = bundle_with(tmp_path / "empty", {"io.containerd.runc.v2.group": ""})
    assert group_id(empty, "c3", namespace_mode=True) == NAMESPACE_GROUP
    assert group_id(str(tmp_path / "missing"), "c4", namespace_mode=True) == NAMESPACE_GROUP
