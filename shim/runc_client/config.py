"""runc invocation settings and error decoding, free of trio so ``delete`` stays lean."""

from __future__ import annotations

import os
import stat

from shim.common.errors import ShimError
from shim.common.options import RUNC_ROOT
from shim.common.record import Factory, record

#: RuncError.status when the runtime binary could not be started at all
NOT_STARTED = -1


class RuncError(ShimError):
    """runc exited non-zero; ``message`` holds runc's own error text."""

    def __init__(self, command: str, status: int, detail: str) -> None:
        detail = detail.strip() or f"exit status {status}"
        super().__init__(f"runc {command} failed: {detail}")
        self.command = command
        self.status = status
        self.detail = detail


def _go_errno_text(err: int) -> str:
    """Go's text for an errno: the C library's message with a lower-case first letter."""
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


def _go_quote(name: str) -> str:
    """strconv.Quote for the printable names a binary has."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _not_executable(path: str) -> str:
    """Why Go's LookPath refuses ``path`` ("" when it would run it)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"stat {path}: {_go_errno_text(e.errno or 0)}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not os.access(path, os.X_OK, effective_ids=True):
        return "permission denied"
    return ""


def _look_path(binary: str) -> tuple[str, str]:
    """Go's LookPath: (the path it would run, why it refuses the binary or "")."""
    if "/" in binary:
        return binary, _not_executable(binary)
    for directory in os.environ.get("PATH", "").split(":"):
        path = os.path.join(directory or ".", binary)
        if not _not_executable(path):
            return path, ""
    return binary, "executable file not found in $PATH"


def exec_error(binary: str, err: OSError) -> str:
    """What the Go shim says when its OCI runtime binary cannot be started (``err``: the
    exec's failure): os/exec's LookPath words, ``exec: "no-runc": executable file not found
    in $PATH`` or ``exec: "/x/runc": permission denied``; a binary LookPath accepts but the
    kernel refuses gets Go's ``fork/exec <path>: <errno text>``. containerd's own tests look
    for the quoted name; every runtime call (client and ``shim delete``) answers this way."""
    path, problem = _look_path(binary)
    if problem:
        return f"exec: {_go_quote(binary)}: {problem}"
    return f"fork/exec {path}: {_go_errno_text(err.errno or 0)}"


def start_error(binary: str, err: OSError) -> str | None:
    """Go's words when ``err`` (from starting the runtime) is about the binary itself (its
    lookup in shim.thp or its exec names it, perhaps as found on PATH); None for any other
    failure (no fds, no memory, the thp-exec step), which keeps its own text."""
    name = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes)) else None
    return exec_error(binary, err) if name and os.path.basename(name) == os.path.basename(binary) else None


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


