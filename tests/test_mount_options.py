"""shim.common.mount.parse_options: mount(8)-style options -> flags, propagation, data."""

from __future__ import annotations

import pytest

from shim.common.mount import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_SHARED,
    MS_SLAVE,
    MS_UNBINDABLE,
    ParsedOptions,
    parse_options,
)


def test_empty() -> None:
    assert parse_options([]) == ParsedOptions(0, 0, "")


def test_overlay_data_passes_through_in_order() -> None:
    options = [
        "index=off",
        "workdir=/var/lib/containerd/snapshots/3/work",
        "upperdir=/var/lib/containerd/snapshots/3/fs",
        "lowerdir=/var/lib/containerd/snapshots/2/fs:/var/lib/containerd/snapshots/1/fs",
        "userxattr",
    ]
    assert parse_options(options) == ParsedOptions(0, 0, ",".join(options))


def test_flags_interleaved_with_data_keep_data_order() -> None:
    parsed = parse_options(["lowerdir=/l", "ro", "upperdir=/u", "nosuid", "workdir=/w"])
    assert parsed.flags == MS_RDONLY | MS_NOSUID
    assert parsed.data == "lowerdir=/l,upperdir=/u,workdir=/w"
    assert parsed.propagation == 0


@pytest.mark.parametrize(
    "options, flags",
    [
        (["ro"], MS_RDONLY),
        (["bind"], MS_BIND),
        (["rbind"], MS_BIND | MS_REC),
        (["nosuid"], MS_NOSUID),
        (["nosuid", "nodev", "noexec"], MS_NOSUID | MS_NODEV | MS_NOEXEC),
        (["rbind", "ro", "nosuid"], MS_BIND | MS_REC | MS_RDONLY | MS_NOSUID),
        (["defaults"], 0),
        (["ro", "rw"], 0),
        (["rw", "ro"], MS_RDONLY),
        (["rbind", "ro", "rw"], MS_BIND | MS_REC),
        (["nosuid", "suid"], 0),
        (["noexec", "exec", "nodev", "dev"], 0),
    ],
)
def test_flags(options: list[str], flags: int) -> None:
    assert parse_options(options) == ParsedOptions(flags, 0, "")


@pytest.mark.parametrize(
    "option, propagation",
    [
        ("private", MS_PRIVATE),
        ("rprivate", MS_PRIVATE | MS_REC),
        ("shared", MS_SHARED),
        ("rshared", MS_SHARED | MS_REC),
        ("slave", MS_SLAVE),
        ("rslave", MS_SLAVE | MS_REC),
        ("unbindable", MS_UNBINDABLE),
        ("runbindable", MS_UNBINDABLE | MS_REC),
    ],
)
def test_propagation_is_separated(option: str, propagation: int) -> None:
    parsed = parse_options(["rbind", option, "ro"])
    assert parsed.propagation == propagation
    assert parsed.flags == MS_BIND | MS_REC | MS_RDONLY  # not mixed into the flags
    assert parsed.data == ""


def test_last_propagation_wins() -> None:
    assert parse_options(["rshared", "rprivate"]).propagation == MS_PRIVATE | MS_REC


def test_compact_lowerdir_names_layers_through_their_common_parent() -> None:
    from shim.common.mount import compact_lowerdir

    root = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"
    layers = [f"{root}/{n}/fs" for n in range(64, 0, -1)]
    data = f"index=off,lowerdir={':'.join(layers)},upperdir={root}/65/fs,workdir={root}/65/work"
    assert len(data) > 4096
    compacted, parent = compact_lowerdir(data, lambda path: "/proc/self/fd/9")
    assert parent == root
    assert len(compacted) < 4096
    options = compacted.split(",")
    assert options[0] == "index=off"
    assert options[1] == "lowerdir=" + ":".join(f"/proc/self/fd/9/{n}/fs" for n in range(64, 0, -1))
    assert options[2:] == [f"upperdir={root}/65/fs", f"workdir={root}/65/work"]  # untouched


def test_compact_lowerdir_leaves_what_it_cannot_shorten() -> None:
    from shim.common.mount import compact_lowerdir

    def never(path: str) -> str:
        raise AssertionError("no parent to open")

    assert compact_lowerdir("lowerdir=/a:/b", never) == ("lowerdir=/a:/b", "")  # only "/" in common
    assert compact_lowerdir("lowerdir=rel/a:rel/b", never) == ("lowerdir=rel/a:rel/b", "")
    assert compact_lowerdir("upperdir=/x", never) == ("upperdir=/x", "")
    assert compact_lowerdir("lowerdir=/l/a", lambda p: "/proc/self/fd/3") == ("lowerdir=/proc/self/fd/3", "/l/a")
