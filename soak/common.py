"""What every soak check shares: the two shims (the table's columns), container ids, logging,
timed ``ctr`` calls, reading a line from a ``ctr`` that streams a container's output, and the
per-process figures (fds, Pss, Rss) the checks report.

The columns are the bench's Go and Python variants (bench/shims.py), so both harnesses select
a shim the same way: Go = ``--runtime io.containerd.runc.v2``, Python =
``--runtime io.containerd.runc.v2-py`` in its default (per-task shim) mode.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import smaps_rollup
from bench.shims import GO, PYTHON, Variant
from integration.harness import Containerd, unix_socket_holders, wait_for

SHIMS: tuple[Variant, ...] = (GO, PYTHON)
BY_NAME = {v.name: v for v in SHIMS}
#: generous bound for an "eventually" (a task stops, events arrive) on a loaded 2-core machine;
#: it only ends a wait that would otherwise hang, it never measures anything
EVENTUALLY = 60.0

_t0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[soak {time.monotonic() - _t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def cid(shim: Variant, kind: str, i: int | str = 0) -> str:
    """Container ids carry the shim (``go-``/``py-``) so leftovers can be told apart."""
    return f"{shim.short}-{kind}-{i}"


@dataclass
class Ids:
    """Every container id a shim's checks created: the leak census looks for all of them."""

    by_shim: dict[str, set[str]] = field(default_factory=lambda: {v.name: set() for v in SHIMS})

    def new(self, shim: Variant, kind: str, i: int | str = 0) -> str:
        name = cid(shim, kind, i)
        self.by_shim[shim.name].add(name)
        return name


def run_args(shim: Variant) -> list[str]:
    return ["--runtime", shim.runtime]


def timed(c: Containerd, *args: str, timeout: float = EVENTUALLY) -> tuple[subprocess.CompletedProcess, float]:
    """``ctr ARGS`` and its wall time (a hung ctr ends as returncode -9 at ``timeout``)."""
    t0 = time.perf_counter()
    try:
        r = c.ctr(*args, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        r = subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", f"ctr timed out after {timeout}s")
    return r, time.perf_counter() - t0


def ctr_or_raise(c: Containerd, *args: str, timeout: float = EVENTUALLY) -> str:
    r, _ = timed(c, *args, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    return r.stdout


def read_line(proc: subprocess.Popen, timeout: float = EVENTUALLY) -> bytes:
    """One line of a ``ctr`` child's stdout (b"" on EOF or timeout): the container said it is up."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return buf
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


def finish(proc: subprocess.Popen, timeout: float = EVENTUALLY) -> tuple[int, bytes, bytes]:
    """Wait for a ``ctr`` child; one that hangs past ``timeout`` is killed (by its pid)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err = (err or b"") + f"\n(ctr killed after {timeout}s)".encode()
    return proc.returncode, out or b"", err or b""


def task_pid(c: Containerd, name: str) -> int:
    return int(c.tasks()[name]["pid"])


def wait_status(c: Containerd, names: list[str], want: str | None | tuple, timeout: float = EVENTUALLY) -> None:
    """Every task of ``names`` has status ``want`` (None: no task at all; a tuple: any of them)."""
    wants = want if isinstance(want, tuple) else (want,)

    def off() -> list[str]:
        tasks = c.tasks()
        return [n for n in names if (tasks.get(n) or {}).get("status") not in wants]
    wait_for(lambda: not off(), timeout=timeout, interval=0.1, message=lambda: f"{want}: not yet {off()[:8]}")


def address_of(c: Containerd, name: str) -> str:
    return (c.bundle_dir / name / "address").read_text().strip().removeprefix("unix://")


def serving_pid(c: Containerd, name: str) -> int:
    """The one process listening on the socket the task's bundle names (its shim)."""
    path = address_of(c, name)
    pids = unix_socket_holders([path], listening=True)[path]
    if len(pids) != 1:
        raise RuntimeError(f"{name}: {len(pids)} processes listen on {path}: {sorted(pids)}")
    return pids.pop()


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def memory(pid: int) -> dict[str, int] | None:
    """{"rss", "pss", "uss"} in bytes (smaps_rollup; USS = Private_Clean + Private_Dirty), None if gone."""
    s = smaps_rollup(pid)
    return None if s is None else {"rss": s.get("Rss", 0), "pss": s.get("Pss", 0),
                                   "uss": s.get("Private_Clean", 0) + s.get("Private_Dirty", 0)}


def remove_tasks(c: Containerd, names: list[str]) -> None:
    """SIGKILL, wait for STOPPED, delete task and container: the ordinary teardown through ctr."""
    present = c.tasks()
    for n in names:
        if n in present:
            c.ctr("task", "kill", "-s", "SIGKILL", n, check=False)
    with contextlib.suppress(TimeoutError):
        wait_status(c, [n for n in names if n in present], ("STOPPED", None))
    for n in names:
        if n in present:
            c.ctr("task", "rm", "-f", n, check=False)
    existing = c.containers()
    gone = [n for n in names if n in existing]
    for k in range(0, len(gone), 50):
        c.ctr("containers", "rm", *gone[k:k + 50], check=False)


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.0f} ms"


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / (1 << 20):.1f} MiB"


def short_path(p: str | Path) -> str:
    return str(p).replace("/run/containerd/", "…/")
