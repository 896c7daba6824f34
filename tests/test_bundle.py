"""shim.bundle.group_id: which shim serves a container (grouping keys in config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.bundle import group_id


def write_config(bundle: Path, annotations: dict[str, str] | None) -> None:
    spec: dict = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))


def test_no_config_means_own_shim(tmp_path: Path) -> None:
    assert group_id(str(tmp_path), "c1") == "c1"


@pytest.mark.parametrize("annotations", [None, {}, {"other": "x"}, {"io.kubernetes.cri.sandbox-id": ""}])
def test_no_group_annotation_means_own_shim(tmp_path: Path, annotations) -> None:
    write_config(tmp_path, annotations)
    assert group_id(str(tmp_path), "c1") == "c1"


def test_cri_sandbox_id_groups_a_pod(tmp_path: Path) -> None:
    write_config(tmp_path, {"io.kubernetes.cri.sandbox-id": "pod1"})
    assert group_id(str(tmp_path), "app") == "pod1"


def test_explicit_group_wins_over_sandbox_id(tmp_path: Path) -> None:
    write_config(tmp_path, {"io.kubernetes.cri.sandbox-id": "pod1", "io.containerd.runc.v2.group": "g"})
    assert group_id(str(tmp_path), "app") == "g"


def test_unparsable_config_with_a_key_falls_back(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-id": ')
    assert group_id(str(tmp_path), "c1") == "c1"


def test_key_outside_annotations_or_repeated_goes_through_json(tmp_path: Path) -> None:
    spec = {"process": {"env": ['X="io.kubernetes.cri.sandbox-id": "fake"']},
            "annotations": {"io.kubernetes.cri.sandbox-id": "pod2"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert group_id(str(tmp_path), "app") == "pod2"


def test_escaped_value_goes_through_json(tmp_path: Path) -> None:
    write_config(tmp_path, {"io.containerd.runc.v2.group": 'g"1'})
    assert group_id(str(tmp_path), "app") == 'g"1'


def test_pretty_printed_config(tmp_path: Path) -> None:
    spec = {"annotations": {"io.kubernetes.cri.sandbox-id": "pod3"}}
    (tmp_path / "config.json").write_text(json.dumps(spec, indent=4))
    assert group_id(str(tmp_path), "app") == "pod3"
