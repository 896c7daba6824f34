"""containerd restarts with tasks running: SIGTERM, then SIGKILL with an outage during which
some tasks exit.

Shims outlive containerd by design; what a node needs is that after containerd is back every
task is still reachable, and that an exit that happened while containerd was away still
reaches it as a /tasks/exit event (CRI learns of exits that way). The exits are real: each
task's init traps SIGUSR1 and exits with its own code; the soak signals them from the host
while containerd is down and waits until they are gone.

An event published before a ``ctr events`` subscriber is live is never shown to it. So that no
exit can slip through between containerd's start and the subscription, the restarted containerd
serves ttrpc (where shims publish) on a new path, and the path the shims know is linked to it
only once the subscriber is live: the shims see one outage, a fraction of a second longer than
the one asked for.
"""

from __future__ import annotations

import os
import signal
import time

from integration.harness import Containerd, pid_alive, wait_for

from .common import SHIMS, Ids, ctr_or_raise, log, remove_tasks, run_args, task_pid, timed, wait_status
from .events import Recording
from .report import Section

#: the init waits in ``wait`` (not a loop of sleeps): no CPU while 40 tasks idle
SCRIPT = 'trap "exit {code}" USR1; sleep 100000 & wait'
FIRST_CODE = 20
#: how long after containerd is back the soak waits for the outage's exit events; the Go shim
#: retries a failed publish at 2, 4, 6, ... s and gives up after 5 retries
DELIVERY_WAIT = 45.0
FULL_OUTAGE = 60.0  # the check


def reachable(c: Containerd, names: list[str], probe: str) -> list[str]:
    """The tasks that are RUNNING and answer an exec with the right output."""
    tasks = c.tasks()
    ok = []
    for n in names:
        if (tasks.get(n) or {}).get("status") != "RUNNING":
            continue
        r, _ = timed(c, "task", "exec", "--exec-id", f"{probe}", n, "echo", f"{probe}-{n}", timeout=30)
        if r.returncode == 0 and r.stdout == f"{probe}-{n}\n":
            ok.append(n)
    return ok


def gate(c: Containerd) -> tuple[str, str]:
    """Point the config's ttrpc address at a new path; return (the shims' path, the new one)."""
    old = c.ttrpc_address
    new = old + "-g"
    text = c.config_path.read_text()
    c.config_path.write_text(text.replace(f'address = "{old}"', f'address = "{new}"'))
    return old, new


def run(c: Containerd, ids: Ids, n: int, exits: int, outage: float) -> Section:
    sec = Section("containerd restart")
    names = {s.name: [ids.new(s, "rs", k) for k in range(n)] for s in SHIMS}
    codes = {name: FIRST_CODE + k for s in SHIMS for k, name in enumerate(names[s.name])}
    everything = [x for s in SHIMS for x in names[s.name]]
    rec = None
    try:
        for s in SHIMS:
            for name in names[s.name]:
                ctr_or_raise(c, "run", "-d", *run_args(s), c.image_ref, name, "sh", "-c",
                             SCRIPT.format(code=codes[name]))
        wait_status(c, everything, "RUNNING")

        t0 = time.monotonic()
        c.restart(signal.SIGTERM)
        back = time.monotonic() - t0
        ok = {s.name: reachable(c, names[s.name], "after-term") for s in SHIMS}
        sec.judged(f"SIGTERM restart (back in {back:.1f} s), {n} tasks/shim: RUNNING + exec answers",
                   len(ok["go"]) == n, len(ok["python"]) == n, f"{len(ok['go'])}/{n}", f"{len(ok['python'])}/{n}")

        leaving = {s.name: names[s.name][:exits] for s in SHIMS}
        pids = {name: task_pid(c, name) for s in SHIMS for name in leaving[s.name]}
        paths: list[str] = []

        def outage_window() -> None:
            down = time.monotonic()
            for pid in pids.values():
                os.kill(pid, signal.SIGUSR1)
            wait_for(lambda: not any(pid_alive(p) for p in pids.values()), timeout=30,
                     message="the outage's tasks to exit")
            paths.extend(gate(c))
            if os.path.lexists(paths[0]):
                os.unlink(paths[0])  # containerd died by SIGKILL: its socket file stays behind
            time.sleep(max(0.0, outage - (time.monotonic() - down)))  # the outage itself, not a wait

        log(f"restart: SIGKILL containerd, {outage:.0f} s outage, {exits} exits/shim meanwhile")
        c.restart(signal.SIGKILL, while_down=outage_window)
        rec = Recording(c)
        os.symlink(paths[1], paths[0])
        opened = time.monotonic()
        seen: dict[str, tuple[float, int]] = {}

        def all_seen() -> bool:
            for e in rec.stream.snapshot():
                if e.topic == "/tasks/exit" and e.body.get("id") in pids and e.body["id"] not in seen:
                    seen[e.body["id"]] = (time.monotonic() - opened, int(e.body.get("exit_status", 0)))
            return len(seen) == len(pids)
        try:
            wait_for(all_seen, timeout=DELIVERY_WAIT, interval=0.1, message="exit events")
        except TimeoutError:
            pass
        _outage_rows(sec, leaving, codes, seen, exits, outage)
        tasks = c.tasks()
        sec.text("containerd's status of the exited tasks after the outage",
                 *[_statuses(tasks, leaving[s.name]) for s in SHIMS])
        rest = {s.name: reachable(c, names[s.name][exits:], "after-kill") for s in SHIMS}
        sec.judged(f"SIGKILL restart: the other {n - exits} tasks/shim RUNNING + exec answers",
                   len(rest["go"]) == n - exits, len(rest["python"]) == n - exits,
                   f"{len(rest['go'])}/{n - exits}", f"{len(rest['python'])}/{n - exits}")
        shorter = "" if outage >= FULL_OUTAGE else f", shorter than the issue's {FULL_OUTAGE:.0f} s"
        sec.notes.append(f"the outage was {outage:.0f} s{shorter}; containerd's ttrpc endpoint was opened to the "
                         f"shims once the event subscriber was live; the soak then waited up to {DELIVERY_WAIT:.0f} s "
                         f"for the exit events ({time.monotonic() - opened:.1f} s)")
        sec.details["exit_events"] = {k: {"after_s": v[0], "status": v[1]} for k, v in seen.items()}
    finally:
        remove_tasks(c, everything)
        if rec is not None:
            rec.close()
    return sec


def _outage_rows(sec: Section, leaving: dict, codes: dict, seen: dict, exits: int, outage: float) -> None:
    got = {s: [n for n in leaving[s] if n in seen] for s in leaving}
    right = {s: [n for n in got[s] if seen[n][1] == codes[n]] for s in leaving}

    def text(s: str) -> str:
        wrong = len(got[s]) - len(right[s])
        return f"{len(got[s])}/{exits} delivered" + (f", {wrong} with a wrong status" if wrong else ", statuses right")
    sec.judged(f"{exits} tasks/shim exit during a {outage:.0f} s containerd outage: /tasks/exit after it",
               len(right["go"]) == exits, len(right["python"]) == exits, text("go"), text("python"))
    after = {s: [seen[n][0] for n in got[s]] for s in leaving}
    sec.measured("… last of those exit events, after containerd's ttrpc was back",
                 max(after["go"], default=None), max(after["python"], default=None),
                 lambda v: "—" if v is None else f"{v:.1f} s")


def _statuses(tasks: dict, names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        st = (tasks.get(n) or {}).get("status", "absent")
        counts[st] = counts.get(st, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
