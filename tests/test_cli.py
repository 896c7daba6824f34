"""shim.launch.cli.parse_args: Go flag package syntax, and what containerd 1.6 sends."""

from __future__ import annotations

import pytest

from shim.launch.cli import UsageError, parse_args
from shim.launch.flags import Flags

ADDRESS = "/run/containerd/containerd.sock"
PUBLISH = "/usr/local/bin/containerd"
BUNDLE = "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc123"


@pytest.mark.parametrize(
    "argv",
    [
        ["-id", "x", "start"],
        ["--id", "x", "start"],
        ["-id=x", "start"],
        ["--id=x", "start"],
    ],
)
def test_value_flag_forms(argv: list[str]) -> None:
    flags = parse_args(argv)
    assert flags.id == "x"
    assert flags.action == "start"


def test_value_containing_equals_and_dashes() -> None:
    flags = parse_args(["-address=/a=b", "-id", "-weird-", "-bundle=", "delete"])
    assert flags.address == "/a=b"
    assert flags.id == "-weird-"  # the value is taken verbatim, as in Go
    assert flags.bundle == ""
    assert flags.action == "delete"


@pytest.mark.parametrize(
    "argv, debug",
    [
        (["-debug"], True),
        (["--debug"], True),
        (["-debug=true"], True),
        (["-debug=1"], True),
        (["-debug=t"], True),
        (["-debug=TRUE"], True),
        (["-debug=false"], False),
        (["-debug=0"], False),
        (["-debug", "-debug=false"], False),
        ([], False),
    ],
)
def test_bool_flag_forms(argv: list[str], debug: bool) -> None:
    flags = parse_args(argv + ["start"])
    assert flags.debug is debug
    assert flags.action == "start"


def test_bool_flag_does_not_take_next_argument() -> None:
    # As in Go: "-debug false" is -debug followed by the positional "false".
    flags = parse_args(["-debug", "start"])
    assert flags.debug is True
    assert flags.action == "start"


def test_version_flag() -> None:
    assert parse_args(["-v"]).version is True
    assert parse_args(["-v"]).action == ""


def test_containerd_16_start_argv() -> None:
    # runtime/v2 shim.Command: -namespace -address -publish-binary, then
    # binary.Start's args: -id ID [-debug] start.
    argv = ["-namespace", "k8s.io", "-address", ADDRESS, "-publish-binary", PUBLISH, "-id", "abc123", "start"]
    assert parse_args(argv) == Flags(
        namespace="k8s.io", address=ADDRESS, publish_binary=PUBLISH, id="abc123", action="start"
    )
    debug = argv[:-1] + ["-debug", "start"]
    assert parse_args(debug) == Flags(
        namespace="k8s.io", address=ADDRESS, publish_binary=PUBLISH, id="abc123", debug=True, action="start"
    )


def test_containerd_16_delete_argv() -> None:
    argv = [
        "-namespace", "default",
        "-address", ADDRESS,
        "-publish-binary", PUBLISH,
        "-id", "abc123",
        "-bundle", BUNDLE,
        "delete",
    ]  # fmt: skip
    assert parse_args(argv) == Flags(
        namespace="default", address=ADDRESS, publish_binary=PUBLISH, id="abc123", bundle=BUNDLE, action="delete"
    )


def test_no_action() -> None:
    assert parse_args([]) == Flags()
    assert parse_args(["-id", "x"]).action == ""


def test_double_dash_ends_flags() -> None:
    flags = parse_args(["-id", "x", "--", "start"])
    assert flags.id == "x"
    assert flags.action == "start"


@pytest.mark.parametrize("argv", [["-nope", "start"], ["--nope=1"], ["-Id", "x"], ["-h"]])
def test_unknown_flag(argv: list[str]) -> None:
    with pytest.raises(UsageError, match="flag provided but not defined"):
        parse_args(argv)


@pytest.mark.parametrize("flag", ["-id", "--namespace", "-address", "-publish-binary", "-bundle", "-socket"])
def test_missing_value(flag: str) -> None:
    with pytest.raises(UsageError, match="flag needs an argument"):
        parse_args([flag])


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "extra"],
        ["-id", "x", "delete", "now"],
        ["start", "-id", "x"],  # flags end at the first positional, as in Go
    ],
)
def test_extra_positional(argv: list[str]) -> None:
    with pytest.raises(UsageError, match="unexpected arguments"):
        parse_args(argv)


def test_socket_flag_is_accepted_and_ignored() -> None:
    """The Go shim takes -socket; containerd never passes it to start/delete, so it is only accepted."""
    from shim.common.record import field_names
    from shim.launch.flags import Flags

    assert parse_args(["-socket", "/run/x.sock", "-id", "c1", "start"]) == Flags(id="c1", action="start")
    assert "socket" not in field_names(Flags)
