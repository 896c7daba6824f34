"""A shim killed under its task, and (ours only) the warm template killed or stopped mid-run.

Shim SIGKILL: a task and an exec are running; the shim dies. containerd must notice, run the
shim binary's ``delete`` action, forget the task, and after ``ctr containers rm`` nothing may be
left: processes, mounts, fifos, socket, runc state, bundle, cgroup.

Template: it only speeds starts up, so killing it (SIGKILL) or freezing it (SIGSTOP) while
containers are being started must cost no start, no running task, and leave nothing behind.
The Go shim has no template: its column says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

from integration.harness import CTR_FIFO_DIR, Containerd, Leftovers, pid_alive, wait_for

from .common import (
    PYTHON,
    SHIMS,
    Ids,
    cid,
    ctr_or_raise,
    finish,
    read_line,
    remove_tasks,
    run_args,
    serving_pid,
    timed,
    wait_status,
)
from .report import Section

NA = "n/a (no template)"


def shim_side(left: Leftovers) -> Leftovers:
    """``left`` without ctr's own fifos (/run/containerd/fifo/...): the client makes them and only
    the client removes them (``ctr task rm``), which it cannot once the task vanished under it."""
    left.fifos = [f for f in left.fifos if not f.startswith(f"{CTR_FIFO_DIR}/")]
    return left


def remove_client_fifos(c: Containerd, names: list[str]) -> list[str]:
    """Remove ctr's fifo dirs of ``names`` (only dirs whose every entry belongs to them)."""
    fifos = [f for f in c.leftovers(names).fifos if f.startswith(f"{CTR_FIFO_DIR}/")]
    for d in {os.path.dirname(f) for f in fifos}:
        if all(any(e.startswith(n + "-") for n in names) for e in os.listdir(d)):
            shutil.rmtree(d, ignore_errors=True)
    return fifos


def leftovers_after(c: Containerd, names: list[str], timeout: float = 30) -> tuple[Leftovers, float]:
    """Wait (bounded) until nothing of ``names`` is left; return what is, and how long it took."""
    t0 = time.monotonic()
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not shim_side(c.leftovers(names)), timeout=timeout, interval=0.2, message="cleanup")
    return shim_side(c.leftovers(names)), time.monotonic() - t0


def shim_sigkill(c: Containerd, shim, name: str) -> dict:
    ctr_or_raise(c, "run", "-d", *run_args(shim), c.image_ref, name, "sleep", "100000")
    wait_status(c, [name], "RUNNING")
    bg = c.ctr_popen("task", "exec", "--exec-id", f"{name}-bg", name, "sh", "-c", "echo up; exec sleep 100000")
    out: dict = {"exec up": read_line(bg) == b"up\n"}
    pid = serving_pid(c, name)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        wait_for(lambda: name not in c.tasks(), timeout=60, interval=0.1, message="containerd to drop the task")
        out["task gone after"] = time.monotonic() - t0
    except TimeoutError:
        out["task gone after"] = None
        out["task status 60 s later"] = (c.tasks().get(name) or {}).get("status")
    rc, _, err = finish(bg, timeout=30)
    out["exec's ctr"] = f"exit {rc}: {err.decode(errors='replace').strip()[-120:]}"
    c.ctr("task", "rm", "-f", name, check=False)
    c.ctr("containers", "rm", name, check=False)
    left, t = leftovers_after(c, [name])
    out["leftovers"], out["clean after"] = str(left) if left else "", t
    out["client fifos"] = remove_client_fifos(c, [name])
    return out


def starts_while(c: Containerd, ids: Ids, n: int, tag: str, action, after: int) -> dict:
    """``n`` sequential ``ctr run --rm`` of ours; ``action()`` runs once ``after`` of them finished."""
    times, wrong = [], []
    for i in range(n):
        if i == after:
            action()
        name = ids.new(PYTHON, tag, i)
        r, t = timed(c, "run", "--rm", *run_args(PYTHON), c.image_ref, name, "sh", "-c", f"echo {i}")
        times.append(t)
        if (r.returncode, r.stdout) != (0, f"{i}\n"):
            wrong.append(f"{name}: exit {r.returncode} {r.stderr.strip()[-160:]}")
    return {"times": times, "wrong": wrong}


def template_fault(c: Containerd, ids: Ids, sig: int, runs: int = 8) -> dict:
    """Kill or stop the template after a few starts of a run of starts, with tasks running."""
    resident = [ids.new(PYTHON, f"tpl{sig}", k) for k in range(3)]
    out: dict = {}
    try:
        for name in resident:
            ctr_or_raise(c, "run", "-d", *run_args(PYTHON), c.image_ref, name, "sleep", "100000")
        wait_status(c, resident, "RUNNING")
        victim = c.template_pid()
        out["template"] = victim

        def act() -> None:
            if victim:
                os.kill(victim, sig)
        out |= starts_while(c, ids, runs, f"tplrun{sig}", act, runs // 2)
        if victim and sig == signal.SIGSTOP:
            out["stopped template after the starts"] = "alive (stopped)" if pid_alive(victim) else "gone (retired)"
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        out["template now"] = c.template_pid()
        served = []
        for name in resident:
            r, _ = timed(c, "task", "exec", "--exec-id", f"after{sig}", name, "echo", "ok")
            served.append(r.returncode == 0 and r.stdout == "ok\n")
        out["resident served"] = sum(served)
    finally:
        remove_tasks(c, resident)
    names = resident + [cid(PYTHON, f"tplrun{sig}", i) for i in range(runs)]
    left, _ = leftovers_after(c, names)
    out["leftovers"] = str(left) if left else ""
    return out


def run(c: Containerd, ids: Ids) -> Section:
    sec = Section("kills")
    res = {s.name: shim_sigkill(c, s, ids.new(s, "shimkill")) for s in SHIMS}
    g, p = res["go"], res["python"]
    sec.judged("shim SIGKILL (task + exec running): containerd drops the task",
               g["task gone after"] is not None, p["task gone after"] is not None,
               *[_s(r["task gone after"]) for r in (g, p)])
    sec.judged("… then `ctr containers rm`: nothing left (processes, mounts, fifos, socket, runc state, bundle, cgroup)",
               not g["leftovers"], not p["leftovers"], *[r["leftovers"] or "nothing" for r in (g, p)])
    sec.text("… the running exec's `ctr task exec`", g["exec's ctr"], p["exec's ctr"])
    sec.text("… ctr's own fifos of the task and exec left (client side, removed by the soak)",
             *[str(len(r["client fifos"])) for r in (g, p)])
    sec.details["shim_sigkill"] = res
    for sig in (signal.SIGKILL, signal.SIGSTOP):
        r = template_fault(c, ids, sig)
        sec.details[f"template_{signal.Signals(sig).name}"] = r
        n = len(r["times"])
        label = signal.Signals(sig).name
        sec.judged(f"template {label} mid-run ({n} starts, 3 tasks running): every start right, tasks served",
                   None, bool(r["template"]) and not r["wrong"] and r["resident served"] == 3, NA,
                   ("" if r["template"] else "no template to signal; ")
                   + f"{n - len(r['wrong'])}/{n} starts, {r['resident served']}/3 served"
                   + (f"; {r['wrong'][0]}" if r["wrong"] else ""))
        sec.text(f"… start times around the {label} (before | first after | max)", NA,
                 f"{_s(r['times'][n // 2 - 1])} | {_s(r['times'][n // 2])} | {_s(max(r['times']))}")
        sec.judged("… nothing left after teardown", None, not r["leftovers"], NA, r["leftovers"] or "nothing")
        if sig == signal.SIGSTOP:
            sec.notes.append(f"template SIGSTOP: the stopped template was {r.get('stopped template after the starts')}; "
                             f"template pid {r['template']} → {r['template now']}")
    return sec


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"
