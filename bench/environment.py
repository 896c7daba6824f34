"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from integration.harness import GO_SHIM_BINARY, PROJECT_ROOT


def _cmd(*argv: str) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=PROJECT_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout or r.stderr).rstrip() or None


def _first_line(s: str | None) -> str | None:
    return s.splitlines()[0] if s else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def collect(thp_original: str | None) -> dict:
    dirty = _cmd("git", "status", "--porcelain")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "os": _first_line(_cmd("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME")),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_bytes": _mem_total(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "containerd": _first_line(_cmd("containerd", "--version")),
        "runc": _first_line(_cmd("runc", "--version")),
        "go_shim": " ".join((_cmd(GO_SHIM_BINARY, "-v") or "").split()) or None,
        "thp_enabled_original": thp_original,
        "thp_defrag": _cmd("cat", "/sys/kernel/mm/transparent_hugepage/defrag"),
        "git_commit": _cmd("git", "rev-parse", "HEAD"),
        # the python shim is measured as it is in the work tree, uncommitted changes included
        "git_status": dirty.splitlines() if dirty else [],
        "shim_env": {k: v for k, v in os.environ.items() if k.startswith("SHIM_")},
    }
