"""shim.runc_client.config: runc's global arguments and error decoding."""

from __future__ import annotations

import json
from pathlib import Path

from shim.common.errors import ShimError
from shim.runc_client.config import RuncConfig, RuncError, last_log_error, log_size


def test_global_args_default() -> None:
    assert RuncConfig().global_args() == ["runc", "--root", "/run/containerd/runc/default"]


def test_global_args_all() -> None:
    cfg = RuncConfig(binary="crun", root="/r/ns", log_path="/b/log.json", systemd_cgroup=True)
    assert cfg.global_args() == [
        "crun", "--root", "/r/ns", "--log", "/b/log.json", "--log-format", "json", "--systemd-cgroup",
    ]  # fmt: skip


def test_global_args_returns_fresh_list() -> None:
    cfg = RuncConfig()
    cfg.global_args().append("create")
    assert cfg.global_args() == ["runc", "--root", "/run/containerd/runc/default"]


def line(level: str, msg: str) -> str:
    return json.dumps({"level": level, "msg": msg, "time": "2024-01-01T00:00:00Z"}) + "\n"


def test_last_log_error_after_offset(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(line("error", "old failure") + line("info", "old info"))
    offset = log_size(str(log))
    assert offset == log.stat().st_size > 0
    with log.open("a") as f:
        f.write(line("info", "starting"))
        f.write(line("error", "first error"))
        f.write(line("warning", "a warning"))
        f.write(line("error", "container_linux.go:380: starting container process caused: exec: \"nope\""))
        f.write(line("error", ""))  # no message: skipped
        f.write("not json at all\n")
        f.write(line("info", "done"))
    assert last_log_error(str(log), offset) == 'container_linux.go:380: starting container process caused: exec: "nope"'


def test_last_log_error_fatal_counts(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(line("error", "e") + line("fatal", "f") + line("debug", "d"))
    assert last_log_error(str(log), 0) == "f"


def test_last_log_error_ignores_errors_before_offset(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(line("error", "old failure"))
    offset = log_size(str(log))
    with log.open("a") as f:
        f.write(line("info", "fine"))
    assert last_log_error(str(log), offset) == ""
    assert last_log_error(str(log), 0) == "old failure"


def test_last_log_error_no_file() -> None:
    assert last_log_error(None, 0) == ""
    assert last_log_error("", 0) == ""
    assert last_log_error("/nonexistent/log.json", 0) == ""
    assert log_size(None) == 0
    assert log_size("/nonexistent/log.json") == 0


def test_runc_error_message() -> None:
    e = RuncError("create", 1, "  container with id exists: abc\n")
    assert isinstance(e, ShimError)
    assert e.message == str(e) == "runc create failed: container with id exists: abc"
    assert (e.command, e.status, e.detail) == ("create", 1, "container with id exists: abc")
    assert e.code == 2


def test_runc_error_without_detail() -> None:
    e = RuncError("kill", 3, " \n")
    assert e.message == "runc kill failed: exit status 3"
    assert e.detail == "exit status 3"
