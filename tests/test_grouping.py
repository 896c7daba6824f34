"""shim.launch.grouping.group_id: which shim serves a container (grouping keys in config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.launch.grouping import group_id


def write_config(bundle: Path, annotations: dict[str, str] | None) -> None:
    spec: dict = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))


def test_no_config_fails_the_start_as_in_go(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        group_id(str(tmp_path), "c1")


@pytest.mark.parametrize("annotations", [None, {}, {"other": "x"}])
def test_no_group_annotation_means_own_shim(tmp_path: Path, annotations) -> None:
    write_config(tmp_path, annotations)
    assert group_id(str(tmp_path), "c1") == "c1"


def test_cri_sandbox_id_groups_a_pod(tmp_path: Path) -> None:
    write_config(tmp_path, {"io.kubernetes.cri.sandbox-id": "pod1"})
    assert group_id(str(tmp_path), "app") == "pod1"


def test_explicit_group_wins_over_sandbox_id(tmp_path: Path) -> None:
    write_config(tmp_path, {"io.kubernetes.cri.sandbox-id": "pod1", "io.containerd.runc.v2.group": "g"})
    assert group_id(str(tmp_path), "app") == "g"


def test_unparsable_config_with_a_key_fails_the_start(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-id": ')
    with pytest.raises(ValueError):
        group_id(str(tmp_path), "c1")


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


# -- the Go shim's grouping, differentially -----------------------------------------------
#
# containerd-shim-runc-v2 (v1.6 runtime/v2/runc/v2/service.go StartShim, and
# cmd/containerd-shim-runc-v2/manager/manager_linux.go Start since 1.7):
#
#     grouping := id
#     spec, err := readSpec()          // json.NewDecoder(config.json).Decode(&struct{
#     if err != nil { return "", err } //     Annotations map[string]string `json:"annotations"`})
#     for _, group := range groupLabels {
#         if groupID, ok := spec.Annotations[group]; ok { grouping = groupID; break }
#     }
#
# So: the first label *present* wins, even when its value is empty (or null, which
# Go stores as ""); a config.json that is missing, not JSON, not an object, or has a
# non-string annotation fails the start; labels anywhere but the top-level
# annotations object do not count.

GO_GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


class GoStartFails(Exception):
    """The Go shim's start returns an error for this bundle."""


def go_group(bundle: Path, id: str) -> str:
    """The Go shim's grouping key for ``bundle`` (a reference, on json.loads)."""
    try:
        raw = (bundle / "config.json").read_bytes()
    except OSError as e:
        raise GoStartFails(f"open config.json: {e.strerror}") from e
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise GoStartFails(f"decode config.json: {e}") from e
    if not isinstance(spec, dict):
        raise GoStartFails("json: cannot unmarshal into Go value of type spec")
    annotations = spec.get("annotations")
    if annotations is None:
        return id
    if not isinstance(annotations, dict) or any(not isinstance(v, (str, type(None))) for v in annotations.values()):
        raise GoStartFails("json: cannot unmarshal into Go struct field spec.annotations")
    for label in GO_GROUP_LABELS:
        if label in annotations:
            return annotations[label] or ""
    return id


def test_group_annotations_are_the_go_shims_in_its_order() -> None:
    from shim.launch.grouping import GROUP_ANNOTATIONS

    assert GROUP_ANNOTATIONS == GO_GROUP_LABELS


#: characters values are made of: JSON escapes, quotes, backslashes, non-ASCII, the key's own text
VALUE_PIECES = ["a", "Z", "0", "-", "_", ".", "/", ":", " ", '"', "\\", "\n", "\t", "\x01", "é", "中", "🙂",
                "io.kubernetes.cri.sandbox-id", '": "', "\\u0041", "}", "{", ","]
OTHER_KEYS = ["io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id-x", "x.io.kubernetes.cri.sandbox-id",
              "io.containerd.runc.v2.groups", "IO.CONTAINERD.RUNC.V2.GROUP", "org.opencontainers.image.ref.name",
              "io.containerd.runc.v2.group ", "ünïcode", "q\"uote"]
SEPARATORS = [(",", ":"), (", ", ": "), (",", " : "), (" ,\n", "\t:\n ")]


def random_value(rng, nonempty: bool = False) -> str:
    n = rng.randint(1 if nonempty else 0, 6)
    return "".join(rng.choice(VALUE_PIECES) for _ in range(n))


def random_spec(rng) -> dict:
    """A config.json Go and we must agree on: string annotations, group labels only where Go looks."""
    annotations = {}
    for key in rng.sample(OTHER_KEYS, rng.randint(0, 4)):
        annotations[key] = random_value(rng)
    for label in GO_GROUP_LABELS:
        if rng.random() < 0.6:
            annotations[label] = random_value(rng, nonempty=True)
    if rng.random() < 0.3:  # a label's text as another annotation's value
        annotations["ref"] = rng.choice(GO_GROUP_LABELS)
    items = list(annotations.items())
    rng.shuffle(items)
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh", "-c"] + ([rng.choice(GO_GROUP_LABELS)] if rng.random() < 0.3 else ["true"]),
            # the label as text inside strings: escaped quotes, never a member
            "env": [f'X="{rng.choice(GO_GROUP_LABELS)}": "fake"' if rng.random() < 0.5 else "X=1",
                    "PATH=/bin", random_value(rng)],
        },
        "hostname": random_value(rng),
        "linux": {"sysctl": {k: random_value(rng) for k in rng.sample(OTHER_KEYS, 2)}},
    }
    if rng.random() < 0.9:
        spec["annotations"] = dict(items)
    elif rng.random() < 0.5:
        spec["annotations"] = None
    top = list(spec.items())
    rng.shuffle(top)
    return dict(top)


def write_raw(bundle: Path, spec: dict, rng) -> None:
    text = json.dumps(spec, indent=rng.choice([None, None, 0, 2, "\t"]), ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice(SEPARATORS), sort_keys=rng.random() < 0.3)
    (bundle / "config.json").write_text(text, encoding="utf-8")


def test_group_id_agrees_with_go_on_generated_configs(tmp_path: Path) -> None:
    import random

    mismatches = []
    for seed in range(600):
        rng = random.Random(seed)
        bundle = tmp_path / str(seed)
        bundle.mkdir()
        write_raw(bundle, random_spec(rng), rng)
        expected = go_group(bundle, "own-id")
        got = group_id(str(bundle), "own-id")
        if got != expected:
            mismatches.append((seed, expected, got, (bundle / "config.json").read_text()[:300]))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("raw,expected", [
    # a label twice in annotations: the last one, in Go's map as in json.loads
    ('{"annotations": {"io.kubernetes.cri.sandbox-id": "a", "io.kubernetes.cri.sandbox-id": "b"}}', "b"),
    # non-ASCII, raw and escaped (a surrogate pair included)
    ('{"annotations": {"io.kubernetes.cri.sandbox-id": "pöd-中-🙂"}}', "pöd-中-🙂"),
    ('{"annotations": {"io.kubernetes.cri.sandbox-id": "p\\u00f6d-\\ud83d\\ude42"}}', "pöd-🙂"),
    # escapes in the value
    ('{"annotations": {"io.containerd.runc.v2.group": "a\\\\b\\"c\\/d\\n"}}', 'a\\b"c/d\n'),
    # whitespace JSON allows around the colon
    ('{"annotations" :\n {"io.kubernetes.cri.sandbox-id"\t:\r\n "pod"}}', "pod"),
    # the label as a value, not a key
    ('{"annotations": {"x": "io.kubernetes.cri.sandbox-id"}}', "own-id"),
    ('{"annotations": {"x": "io.kubernetes.cri.sandbox-id", "io.kubernetes.cri.sandbox-id": "pod"}}', "pod"),
    # the explicit group wins, wherever it is in the object
    ('{"annotations": {"io.kubernetes.cri.sandbox-id": "pod", "io.containerd.runc.v2.group": "g"}}', "g"),
    # annotations null, or absent, with the label's text elsewhere as a string
    ('{"annotations": null, "hostname": "io.kubernetes.cri.sandbox-id"}', "own-id"),
])
def test_group_id_edge_cases_agree_with_go(tmp_path: Path, raw: str, expected: str) -> None:
    (tmp_path / "config.json").write_text(raw, encoding="utf-8")
    assert go_group(tmp_path, "own-id") == expected  # the reference agrees with the table
    assert group_id(str(tmp_path), "own-id") == expected


@pytest.mark.parametrize("annotations,expected", [
    ({"io.kubernetes.cri.sandbox-id": ""}, ""),
    ({"io.containerd.runc.v2.group": ""}, ""),
    # the first label present ends the search, even empty: the sandbox id is not consulted
    ({"io.containerd.runc.v2.group": "", "io.kubernetes.cri.sandbox-id": "pod1"}, ""),
    # null: Go stores "" in the map, so the label is present, and empty
    ({"io.kubernetes.cri.sandbox-id": None}, ""),
])
def test_empty_group_annotation_is_a_group_in_go(tmp_path: Path, annotations, expected) -> None:
    write_config(tmp_path, annotations)
    assert go_group(tmp_path, "c1") == expected
    assert group_id(str(tmp_path), "c1") == expected


@pytest.mark.parametrize("raw", [
    None,  # no config.json at all
    '{"annotations": {"io.kubernetes.cri.sandbox-id": ',  # not JSON, with a label
    '{"annotations": {"other": ',  # not JSON, no label
    '["io.kubernetes.cri.sandbox-id"]',  # not an object
    '{"annotations": {"io.kubernetes.cri.sandbox-id": 5}}',  # not a string
    '{"annotations": {"io.kubernetes.cri.sandbox-id": "pod", "n": 5}}',  # another value not a string
    '{"annotations": ["io.kubernetes.cri.sandbox-id"]}',  # annotations not an object
])
def test_config_go_cannot_read_fails_the_start(tmp_path: Path, raw) -> None:
    if raw is not None:
        (tmp_path / "config.json").write_text(raw)
    with pytest.raises(GoStartFails):
        go_group(tmp_path, "c1")
    with pytest.raises((OSError, ValueError)):  # the start must fail, as the Go shim's does
        group_id(str(tmp_path), "c1")


@pytest.mark.parametrize("raw,expected", [
    # a label as a member of another object, once: not an annotation
    ('{"linux": {"sysctl": {"io.kubernetes.cri.sandbox-id": "fake"}}}', "c1"),
    ('{"io.kubernetes.cri.sandbox-id": "fake", "annotations": {}}', "c1"),
    ('{"annotations": {"x": "y"}, "process": {"user": {"io.containerd.runc.v2.group": "fake"}}}', "c1"),
    # the label spelled with a JSON escape is the same key once decoded
    ('{"annotations": {"io.kubernetes.cri.sandbox\\u002did": "pod"}}', "pod"),
])
def test_only_the_annotations_object_counts_as_in_go(tmp_path: Path, raw: str, expected: str) -> None:
    (tmp_path / "config.json").write_text(raw)
    assert go_group(tmp_path, "c1") == expected
    assert group_id(str(tmp_path), "c1") == expected
