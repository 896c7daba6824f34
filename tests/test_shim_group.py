"""ShimGroup: the runtime option that picks which tasks one shim serves (start's side)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.launch.bootstrap import LaunchSettings, RawAny, launch_settings
from shim.launch.grouping import NAMESPACE_GROUP, group_id
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
    settings = launch_settings(toml_options('ShimGroup = "namespace"\nShimCgroup = "/shims"\n'))
    assert settings.shim_group == "namespace" and settings.shim_cgroup() == "/shims"
    path = tmp_path / "runc.toml"
    path.write_text('shim_group = "pod"\n')
    by_path = RawAny(RUNTIMEOPTIONS, runtimeoptions_pb2.Options(config_path=str(path)).SerializeToString())
    assert launch_settings(by_path).shim_group == "pod"


def test_typed_runc_options_have_no_group_and_keep_their_cgroup() -> None:
    typed = RawAny("containerd.runc.v1.Options", runc_options_pb2.Options(shim_cgroup="/x").SerializeToString())
    assert launch_settings(typed) == LaunchSettings(typed_cgroup="/x")
    assert launch_settings(typed).shim_cgroup() == "/x"
    assert launch_settings(None) == LaunchSettings()


def test_unknown_group_is_refused_and_unreadable_options_are_ignored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ShimGroup 'node'"):
        launch_settings(toml_options('ShimGroup = "node"\n'))
    broken = launch_settings(toml_options("ShimGroup = \n"))  # broken TOML: like Go, ignored
    assert broken.shim_group == "" and broken.shim_cgroup() == ""
    missing = RawAny(RUNTIMEOPTIONS, runtimeoptions_pb2.Options(config_path=str(tmp_path / "nope")).SerializeToString())
    assert launch_settings(missing) == LaunchSettings()


@pytest.mark.parametrize("text", [
    'ShimGroup = "namespace"\n',
    "ShimGroup = 'namespace'\n",
    'BinaryName = "crun"\n# ShimGroup = "pod"\nshimgroup="namespace"  # one shim\n',
    'SHIMGROUP = "pod"\n',
    '"ShimGroup" = "namespace"\n',
    'BinaryName = "runc"\n',
    '# no group here, only the word group in a comment\nRoot = "/r"\n',
    'ShimGroup = "name\\u0073pace"\n',  # an escape: tomllib decides
    '[table]\nShimGroup = "pod"\n',  # a table: tomllib decides (and it is not top level)
    'ShimGroup = "namespace" trailing\n',  # invalid TOML: ignored
    'Root = """\nmulti\n"""\nShimGroup = "pod"\n',
])
def test_group_scan_agrees_with_tomllib(text: str) -> None:
    import tomllib

    from shim.launch.grouping import toml_group

    try:
        data = {k.lower(): v for k, v in tomllib.loads(text).items()}
        expected = data.get("shimgroup", data.get("shim_group", ""))
    except tomllib.TOMLDecodeError:
        expected = ""
    assert toml_group(text) == expected


def test_start_reads_the_group_without_importing_tomllib(tmp_path: Path) -> None:
    """tomllib costs ~20 ms to import on every CRI container start; a flat TOML needs none."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    body = 'BinaryName = "runc"\nShimGroup = "namespace"\nShimCgroup = "/x"\n'
    value = runtimeoptions_pb2.Options(config_body=body.encode()).SerializeToString()
    probe = (
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        "from shim.launch.bootstrap import RawAny, launch_settings\n"
        f"s = launch_settings(RawAny({RUNTIMEOPTIONS!r}, {value!r}))\n"
        "print(s.shim_group, 'tomllib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["namespace", "False"]


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
    with pytest.raises(FileNotFoundError):  # as Go's start: no config.json, no start
        group_id(str(tmp_path / "missing"), "c4", namespace_mode=True)
