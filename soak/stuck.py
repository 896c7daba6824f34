"""Stuck containers: the shim must keep answering while one of its processes is wedged.

Four ways a container gets stuck: its stdout floods a fifo nobody reads (``ctr run -d`` leaves
no reader), its stdin is fed but never read, it ignores SIGTERM, and an exec exits leaving a
grandchild that holds the exec's stdout. In each state the soak times State (a direct ttrpc
call on the shim's socket: the shim's own answer), ``ctr task ps``, ``ctr task exec`` (output
checked) and ``ctr task kill -s SIGKILL``; each must be answered within ``BOUND``. What
happens to the stuck exec itself is reported, not judged.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time

from integration.harness import Containerd, read_status, wait_for

from .common import (
    SHIMS,
    Ids,
    address_of,
    ctr_or_raise,
    finish,
    read_line,
    remove_tasks,
    run_args,
    task_pid,
    timed,
    wait_status,
)
from .report import Section
from .wire import state

BOUND = 1.0
GRANDCHILD_WAIT = 5.0  # how long the soak lets the grandchild's exec's ctr return by itself
SCENARIOS = ("stdout flood, no reader", "stdin fed, never read", "SIGTERM ignored", "exec left a grandchild on stdout")


def _quiet(progress, quiet: float = 0.5, timeout: float = 30) -> None:
    """Wait until ``progress()`` stops changing for ``quiet`` seconds (a pipe has filled)."""
    last = [progress(), time.monotonic()]

    def still() -> bool:
        now = progress()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= quiet
    wait_for(still, timeout=timeout, interval=0.1, message="output to stall")


def _blocked(pid: int) -> bool:
    """The process sleeps in the kernel (a full pipe) rather than running."""
    return read_status(pid).get("State", "").startswith("S")


class Feeder:
    """Writes to a ctr's stdin until it blocks; counts what got through; stops when told."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.fd, self.sent, self.stop = proc.stdin.fileno(), 0, threading.Event()
        os.set_blocking(self.fd, False)
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        chunk = b"x" * 4096
        while not self.stop.is_set():
            try:
                self.sent += os.write(self.fd, chunk)
            except BlockingIOError:
                select.select([], [self.fd], [], 0.1)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def probe(c: Containerd, name: str, tag: str, before_kill=None) -> dict[str, float | str]:
    """Time State, ps, exec and kill on a stuck task; a wrong answer is recorded as text."""
    out: dict[str, float | str] = {}
    code, t = state(address_of(c, name), name, c.namespace, timeout=10)
    out["State"] = t if code == 0 else f"code {code} after {t:.2f} s"
    r, t = timed(c, "task", "ps", name, timeout=30)
    out["ps"] = t if r.returncode == 0 else f"exit {r.returncode} after {t:.2f} s"
    r, t = timed(c, "task", "exec", "--exec-id", f"probe-{tag}", name, "echo", "probe", timeout=30)
    out["exec"] = t if (r.returncode, r.stdout) == (0, "probe\n") else f"exit {r.returncode} {r.stdout!r} after {t:.2f} s"
    if before_kill is not None:
        before_kill()
    r, t = timed(c, "task", "kill", "-s", "SIGKILL", name, timeout=30)
    out["kill"] = t if r.returncode == 0 else f"exit {r.returncode} after {t:.2f} s"
    t0 = time.monotonic()
    try:
        wait_status(c, [name], ("STOPPED", None), timeout=30)  # an attached ctr deletes it at once
        out["stopped after kill"] = time.monotonic() - t0
    except TimeoutError:
        out["stopped after kill"] = "not within 30 s"
    return out


def scenario(c: Containerd, shim, name: str, which: str, extra: dict) -> dict:
    """Bring ``name`` into the stuck state ``which``, probe it, clean up what the scenario started."""
    attached = ["run", *run_args(shim)]
    detached = ["run", "-d", *run_args(shim)]
    procs: list[subprocess.Popen] = []
    feeder = None
    hooks = []  # run just before the kill
    try:
        if which == SCENARIOS[0]:
            ctr_or_raise(c, *detached, c.image_ref, name, "sh", "-c", "exec yes flood")
            wait_status(c, [name], "RUNNING")
            pid = task_pid(c, name)
            wait_for(lambda: _blocked(pid), timeout=30, message="yes to block on a full pipe")
        elif which == SCENARIOS[1]:
            procs.append(c.ctr_popen(*attached, c.image_ref, name, "sleep", "100000", stdin=subprocess.PIPE))
            wait_status(c, [name], "RUNNING")
            feeder = Feeder(procs[0])
            _quiet(lambda: feeder.sent)
            extra["stdin bytes accepted before blocking"] = feeder.sent
        elif which == SCENARIOS[2]:
            ctr_or_raise(c, *detached, c.image_ref, name, "sleep", "100000")
            wait_status(c, [name], "RUNNING")
            r, t = timed(c, "task", "kill", "-s", "SIGTERM", name)
            extra["SIGTERM answered"] = t if r.returncode == 0 else f"exit {r.returncode}"
            wait_for(lambda: _blocked(task_pid(c, name)), timeout=10, message="sleep to go on sleeping")
        else:
            ctr_or_raise(c, *detached, c.image_ref, name, "sleep", "100000")
            wait_status(c, [name], "RUNNING")
            t0 = time.monotonic()
            procs.append(c.ctr_popen("task", "exec", "--exec-id", "gc", name, "sh", "-c",
                                     "sleep 100000 & echo started"))
            extra["exec printed"] = read_line(procs[0]).decode(errors="replace").strip()
            with contextlib.suppress(TimeoutError):  # report whether ctr returns on its own; no verdict
                wait_for(lambda: procs[0].poll() is not None, timeout=GRANDCHILD_WAIT, message="exec's ctr")

            def exec_state() -> None:
                rc = procs[0].poll()
                extra["exec's ctr before the kill"] = (f"returned (exit {rc})" if rc is not None else
                                                       f"still waiting {time.monotonic() - t0:.1f} s after start")
            hooks.append(exec_state)
        return probe(c, name, "1", hooks[0] if hooks else None)
    finally:
        if feeder is not None:
            feeder.close()
        for p in procs:
            if p.stdin:
                p.stdin.close()
                p.stdin = None
            finish(p, timeout=30)
        remove_tasks(c, [name])


def run(c: Containerd, ids: Ids) -> Section:
    sec = Section("stuck containers")
    results: dict = {s.name: {} for s in SHIMS}
    extras: dict = {s.name: {} for s in SHIMS}
    for k, which in enumerate(SCENARIOS):
        for s in SHIMS:
            extras[s.name][which] = {}
            try:
                results[s.name][which] = scenario(c, s, ids.new(s, "stuck", k), which, extras[s.name][which])
            except Exception as e:  # noqa: BLE001 - a scenario that could not be set up is a result too
                results[s.name][which] = {"setup": f"{type(e).__name__}: {e}"[:300]}
        for call in ("State", "ps", "exec", "kill"):
            vals = {s.name: results[s.name][which].get(call, results[s.name][which].get("setup")) for s in SHIMS}
            ok = {k2: isinstance(v, float) and v < BOUND for k2, v in vals.items()}
            sec.judged(f"{which}: {call} answered < {BOUND:.0f} s", ok["go"], ok["python"],
                       _fmt(vals["go"]), _fmt(vals["python"]))
        after = {s.name: results[s.name][which].get("stopped after kill") for s in SHIMS}
        sec.text(f"{which}: gone or STOPPED after the SIGKILL", _fmt(after["go"], "s"), _fmt(after["python"], "s"))
    for s in SHIMS:
        for which, ex in extras[s.name].items():
            for k, v in ex.items():
                sec.notes.append(f"{s.label}, {which}: {k}: {_fmt(v) if isinstance(v, float) else v}")
    sec.details = {"results": results, "extras": extras}
    return sec


def _fmt(v, unit: str = "ms") -> str:
    if isinstance(v, float):
        return f"{v * 1e3:.0f} ms" if unit == "ms" else f"{v:.2f} s"
    return "—" if v is None else str(v)
