"""runc invocation settings and error decoding, free of trio so ``delete`` stays lean."""

from __future__ import annotations

import os

from shim.common.errors import ShimError
from shim.common.options import RUNC_ROOT
from shim.common.record import Factory, record


class RuncError(ShimError):
    """runc exited non-zero; ``message`` holds runc's own error text."""

    def __init__(self, command: str, status: int, detail: str) -> None:
        detail = detail.strip() or f"exit status {status}"
        super().__init__(f"runc {command} failed: {detail}")
        self.command = command
        self.status = status
        self.detail = detail


@record
class RuncConfig:
    binary: str = "runc"
    root: str = os.path.join(RUNC_ROOT, "default")
    log_path: str | None = None
    systemd_cgroup: bool = False
    criu: str = ""
    thp_original: int = 0
    extra_env: dict[str, str] = Factory(dict)

    def global_args(self) -> list[str]:
        args = [self.binary, "--root", self.root]
        if self.log_path:
            args += ["--log", self.log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            args.append("--systemd-cgroup")
        if self.criu:
            args += ["--criu", self.criu]
        return args


@record
class Stdio:
    """File descriptors runc passes to the container (None → /dev/null)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


def last_log_error(path: str | None, offset: int) -> str:
    """The last error message runc wrote to its JSON log after ``offset``."""
    if not path:
        return ""
    import json  # only on a failure path; delete's common path must not pay for it

    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal") and entry.get("msg"):
            return str(entry["msg"])
    return ""


def log_size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


