"""shim.template.relayed: which relayed starts the template answers itself, and its read of stdin."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shim.template.relayed import Stdin, likely_joins, read_stdin

START = ["-namespace", "ns1", "-address", "/run/containerd/containerd.sock", "-id", "c2", "start"]


def bundle_with(tmp_path: Path, annotations: object) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"annotations": annotations}))
    return str(tmp_path)


@pytest.mark.parametrize(("annotations", "joins"), [
    ({"io.kubernetes.cri.sandbox-id": "pod"}, True),  # a pod's container
    ({"io.containerd.runc.v2.group": "g"}, True),
    ({"io.kubernetes.cri.sandbox-id": "c2"}, False),  # the sandbox itself: its own group
    ({"io.kubernetes.cri.sandbox-id": ""}, False),
    ({}, False),
    (None, False),
    ("not an object", False),  # the launcher child reports it
])
def test_a_start_likely_joins_when_its_bundle_names_another_tasks_group(tmp_path, annotations, joins) -> None:
    assert likely_joins(START, bundle_with(tmp_path, annotations)) is joins


def test_a_bundle_given_by_flag_counts_over_the_working_directory(tmp_path) -> None:
    bundle = bundle_with(tmp_path, {"io.kubernetes.cri.sandbox-id": "pod"})
    assert likely_joins(["-bundle", bundle, *START], "/nonexistent") is True


@pytest.mark.parametrize("args", [
    START[:-1] + ["delete"],  # not a start
    [a for a in START if a not in ("-id", "c2")],  # no id
    ["-no-such-flag", *START],  # not ours to judge: the child reports it
])
def test_anything_but_a_plain_start_is_left_to_the_launcher_child(tmp_path, args) -> None:
    assert likely_joins(args, bundle_with(tmp_path, {"io.kubernetes.cri.sandbox-id": "pod"})) is False


def test_no_config_json_is_left_to_the_launcher_child(tmp_path) -> None:
    assert likely_joins(START, str(tmp_path)) is False


def test_stdin_is_read_to_its_end() -> None:
    r, w = os.pipe()
    os.write(w, b"options")
    os.close(w)
    try:
        assert read_stdin(r, timeout=30) == Stdin(b"options", True)
    finally:
        os.close(r)


def test_a_stdin_still_open_at_the_timeout_is_what_came_so_far() -> None:
    r, w = os.pipe()
    os.write(w, b"opt")
    try:
        assert read_stdin(r, timeout=0.05) == Stdin(b"opt", False)
    finally:
        os.close(r)
        os.close(w)


def test_an_unreadable_stdin_reads_as_empty() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    assert read_stdin(r, timeout=30) == Stdin(b"", True)
