"""shim.mount.parse_options: mount(8)-style options -> flags, propagation, data."""

from __future__ import annotations

import pytest

from shim.mount import (
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
