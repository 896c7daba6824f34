"""Checkpoint and restore with criu: the request's flags, criu's work directory, its logs.

The container (``shim.daemon.container``) runs the OCI runtime's checkpoint/restore under
the init's lock; what is criu-specific lives here: which flags a
CheckpointTaskRequest means, where criu works, and the end of its log that says
why it failed (read in a worker thread by the caller).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field


@dataclass
class CheckpointRequest:
    """CheckpointTaskRequest with its containerd.runc.v1.CheckpointOptions."""

    path: str
    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: list[str] = field(default_factory=list)
    cgroups_mode: str = ""
    work_path: str = ""

    def runc_flags(self) -> list[str]:
        flags = [] if self.exit else ["--leave-running"]
        flags += ["--tcp-established"] if self.open_tcp else []
        flags += ["--ext-unix-sk"] if self.external_unix_sockets else []
        flags += ["--shell-job"] if self.terminal else []
        flags += ["--file-locks"] if self.file_locks else []
        for ns in self.empty_namespaces:
            flags += ["--empty-ns", ns]
        if self.cgroups_mode:
            flags += ["--manage-cgroups-mode", self.cgroups_mode]
        return flags


def work_dir(bundle: str, requested: str) -> tuple[str, bool]:
    """(criu's work dir, whether it is ours to remove): containerd's ``work`` link, as the Go shim uses."""
    if requested:
        return requested, False
    base = os.path.join(bundle, "work")
    return os.path.join(base if os.path.isdir(base) else bundle, "criu-work"), True


def log_tail(work: str, name: str, lines: int = 15) -> str:
    """The end of criu's log, which says why a dump or restore failed (blocking)."""
    try:
        with open(os.path.join(work, name), errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError:
        return ""
    return f"\ncriu {name} ({work}):\n" + "\n".join(tail)


def dump_failure(work: str, kept: str) -> str:
    """criu's dump log tail for the error, and a copy kept at ``kept`` (blocking)."""
    tail = log_tail(work, "dump.log")
    try:
        shutil.copyfile(os.path.join(work, "dump.log"), kept)
        tail += f"\n(kept as {kept})"
    except OSError:
        pass
    return tail


def remove_work_dir(work: str) -> None:
    shutil.rmtree(work, ignore_errors=True)
