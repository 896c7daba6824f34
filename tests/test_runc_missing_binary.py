"""An OCI runtime binary that cannot be run: every runtime call fails with Go's os/exec words.

containerd's TestContainerRuntimeOptionsv2 looks for the quoted name in the error; the
Go shim's text comes from os/exec's LookPath (``exec: "no-runc": executable file not
found in $PATH``). Nothing here starts a process: the exec fails before any exit exists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.daemon.reaper import ExitRouter
from shim.launch import cleanup
from shim.runc_client.client import Runc
from shim.runc_client.config import RuncConfig, RuncError, Stdio, exec_error


def calls(runc: Runc, tmp: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of every runtime command the shim makes."""
    stdio = Stdio()
    return {
        "create": lambda: runc.create("c", tmp, f"{tmp}/pid", stdio),
        "start": lambda: runc.start("c"),
        "exec": lambda: runc.exec("c", f"{tmp}/p.json", f"{tmp}/pid", stdio),
        "kill": lambda: runc.kill("c", 9, all=True),
        "delete": lambda: runc.delete("c", force=True),
        "ps": lambda: runc.ps("c"),
        "pause": lambda: runc.pause("c"),
        "resume": lambda: runc.resume("c"),
        "update": lambda: runc.update("c", b"{}"),
        "checkpoint": lambda: runc.checkpoint("c", f"{tmp}/img", f"{tmp}/work", []),
        "restore": lambda: runc.restore("c", tmp, f"{tmp}/img", f"{tmp}/work", f"{tmp}/pid", stdio),
    }


async def every_call_fails_with(binary: str, tmp_path: Path, expected: str) -> None:
    runc = Runc(RuncConfig(binary=binary, root=str(tmp_path / "root")), ExitRouter())
    for name, call in calls(runc, str(tmp_path)).items():
        with pytest.raises(RuncError) as info:
            await call()
        assert info.value.command == name
        assert info.value.detail == expected, name
        assert info.value.code == 2  # Unknown, as errdefs gives the Go shim's plain errors


async def test_a_name_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    await every_call_fails_with("no-runc", tmp_path, 'exec: "no-runc": executable file not found in $PATH')


async def test_a_name_on_path_that_is_not_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "no-runc").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    await every_call_fails_with("no-runc", tmp_path, 'exec: "no-runc": executable file not found in $PATH')


async def test_a_path_that_is_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "runc"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    await every_call_fails_with(str(path), tmp_path, f'exec: "{path}": permission denied')


async def test_a_path_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "runc"
    await every_call_fails_with(
        str(path), tmp_path, f'exec: "{path}": stat {path}: no such file or directory'
    )


async def test_a_directory(tmp_path: Path) -> None:
    await every_call_fails_with(str(tmp_path), tmp_path, f'exec: "{tmp_path}": is a directory')


def test_an_executable_that_the_kernel_cannot_run(tmp_path: Path) -> None:
    """LookPath is happy, the exec is not: Go's ``fork/exec`` words with the errno's text."""
    path = tmp_path / "runc"
    path.write_bytes(b"\x00not a program")
    path.chmod(0o755)
    assert exec_error(str(path), OSError(8, "Exec format error")) == f"fork/exec {path}: exec format error"


def test_the_shim_delete_action_survives_a_missing_binary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shim delete`` (containerd's cleanup of a dead shim) runs the runtime too: it warns
    with Go's words instead of dying of a Python traceback."""
    monkeypatch.setenv("PATH", str(tmp_path))
    cleanup.force_delete(RuncConfig(binary="no-runc", root=str(tmp_path)), "c")
    assert 'exec: "no-runc": executable file not found in $PATH' in capsys.readouterr().err


def test_a_go_style_quote() -> None:
    assert exec_error('a"b', FileNotFoundError(2, "x")).startswith('exec: "a\\"b": ')
