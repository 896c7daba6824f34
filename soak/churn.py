"""Churn: many sequential ``ctr run --rm`` and many execs into one task, per shim.

Four streams run at once (run --rm and exec, for each shim), each sequential in itself, so both
shims see the same machine load and the run fits its time budget on two cores. Every run's and
exec's exit code and output are checked as ctr returns, and its event sequence afterwards from
one recorded ``ctr events`` stream. The exec target's shim is sampled (fds, Pss, USS, Rss) every
``sample_every`` execs: a leak shows as growth per 1000 execs once the first window has warmed
it up. USS (private pages) is the leak measure: a forked Python shim's Pss also moves with how
many other shims share the template's pages, i.e. with the run --rm stream next to it.

Exit codes vary: ``exit K`` for most, and a process killed by SIGKILL (137) or SIGTERM (143).
A container's init is pid 1 of its pid namespace and so cannot die by SIGTERM; the SIGTERM runs
join the pid namespace of a holder task of the same shim (``--with-ns pid:...``), where their
``sleep`` is an ordinary process. Execs are never pid 1, so theirs are killed directly.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from dataclasses import dataclass, field

from bench.shims import Variant
from integration.harness import Containerd

from .common import (
    SHIMS,
    Ids,
    ctr_or_raise,
    fd_count,
    finish,
    log,
    memory,
    mib,
    ms,
    read_line,
    remove_tasks,
    run_args,
    serving_pid,
    task_pid,
    timed,
    wait_status,
)
from .events import Recording
from .report import Section

UP = b"up\n"


@dataclass
class Tally:
    done: int = 0
    wrong: int = 0
    lost_output: int = 0  # exit status right, output not (ctr stops reading at the exit event)
    first_wrong: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    expect: dict = field(default_factory=dict)  # (container id, exec id | None) -> exit status
    samples: list[dict] = field(default_factory=list)  # exec target's shim, every sample_every execs
    error: str | None = None

    def check(self, what: str, rc: int, out: str, want_rc: int, want_out: str) -> None:
        self.done += 1
        if rc != want_rc or out != want_out:
            self.wrong += 1
            self.lost_output += rc == want_rc
            if len(self.first_wrong) < 10:
                self.first_wrong.append(f"{what}: exit {rc} out {out[:80]!r}, expected {want_rc} {want_out!r}")


def plan(i: int, every: int) -> tuple[str, int]:
    """(kind, expected status) of run ``i``: mostly ``exit K``, one SIGKILL and one SIGTERM per ``every``."""
    if i % every == every // 2:
        return "term", 128 + signal.SIGTERM
    if i % every == every - 1:
        return "kill", 128 + signal.SIGKILL
    return "exit", i % 126


def killed(c: Containerd, argv: list[str], kill: list[str], sig: int, tally: Tally, what: str) -> float:
    """Start ``ctr ...`` whose container prints ``up`` then sleeps; kill it once it is up."""
    t0 = time.perf_counter()
    proc = c.ctr_popen(*argv)
    line = read_line(proc)
    if line == UP:
        c.ctr(*kill, "-s", signal.Signals(sig).name, check=False)
    rc, out, err = finish(proc)
    tally.check(what, rc, (line + out).decode(errors="replace"), 128 + sig, UP.decode())
    if rc != 128 + sig and err and len(tally.first_wrong) <= 10:
        tally.first_wrong[-1:] = [tally.first_wrong[-1] + f" ({err.decode(errors='replace').strip()[-200:]})"]
    return time.perf_counter() - t0


def run_rm_stream(c: Containerd, shim: Variant, n: int, ids: Ids, holder: int, tally: Tally) -> None:
    for i in range(n):
        name = ids.new(shim, "rm", i)
        kind, status = plan(i, 10)
        tally.expect[(name, None)] = status
        if kind == "exit":
            r, t = timed(c, "run", "--rm", *run_args(shim), c.image_ref, name, "sh", "-c", f"echo r{i}; exit {status}")
            tally.check(name, r.returncode, r.stdout, status, f"r{i}\n")
        else:
            joins = ["--with-ns", f"pid:/proc/{holder}/ns/pid"] if kind == "term" else []
            t = killed(c, ["run", "--rm", *run_args(shim), *joins, c.image_ref, name, "sh", "-c", "echo up; exec sleep 1000"],
                       ["task", "kill", name], status - 128, tally, name)
        tally.times.append(t)
        if (i + 1) % 250 == 0:
            log(f"churn {shim.name}: {i + 1}/{n} run --rm, {tally.wrong} wrong")


def sample(shim_pid: int, i: int) -> dict:
    return {"execs": i, "fds": fd_count(shim_pid), **(memory(shim_pid) or {})}


def exec_stream(c: Containerd, shim: Variant, n: int, target: str, every: int, tally: Tally) -> None:
    shim_pid = serving_pid(c, target)
    tally.samples.append(sample(shim_pid, 0))
    for i in range(n):
        eid = f"x{i}"
        kind, status = plan(i, 100)
        tally.expect[(target, eid)] = status
        if kind == "exit":
            r, t = timed(c, "task", "exec", "--exec-id", eid, target, "sh", "-c", f"echo {eid}; exit {status}")
            tally.check(eid, r.returncode, r.stdout, status, f"{eid}\n")
        else:
            t = killed(c, ["task", "exec", "--exec-id", eid, target, "sh", "-c", "echo up; exec sleep 1000"],
                       ["task", "kill", "--exec-id", eid, target], status - 128, tally, eid)
        tally.times.append(t)
        if (i + 1) % every == 0 or i + 1 == n:
            tally.samples.append(sample(shim_pid, i + 1))
        if (i + 1) % 1000 == 0:
            log(f"churn {shim.name}: {i + 1}/{n} execs, {tally.wrong} wrong")


def _guarded(fn, tally: Tally, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - a stream that died is reported, the others go on
        tally.error = f"{type(e).__name__}: {e}"
        log(f"churn stream failed: {tally.error}")


def growth_per_1000(samples: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` over execs, per 1000, from the end of the first window on."""
    pts = [(s["execs"], s[key]) for s in samples[1:] if s.get(key) is not None]
    if len(pts) < 2:
        return None
    xs, ys = zip(*pts)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def run(c: Containerd, ids: Ids, runs: int, execs: int, sample_every: int) -> Section:
    sec = Section("churn")
    rec = Recording(c)
    holders = {s.name: ids.new(s, "pidns") for s in SHIMS}
    targets = {s.name: ids.new(s, "exec") for s in SHIMS}
    rm = {s.name: Tally() for s in SHIMS}
    ex = {s.name: Tally() for s in SHIMS}
    try:
        for s in SHIMS:
            for name in (holders[s.name], targets[s.name]):
                ctr_or_raise(c, "run", "-d", *run_args(s), c.image_ref, name, "sleep", "100000")
        wait_status(c, list(holders.values()) + list(targets.values()), "RUNNING")
        threads = []
        for s in SHIMS:
            threads.append(threading.Thread(target=_guarded, args=(run_rm_stream, rm[s.name], c, s, runs,
                                                                    ids, task_pid(c, holders[s.name]), rm[s.name])))
            threads.append(threading.Thread(target=_guarded, args=(exec_stream, ex[s.name], c, s, execs,
                                                                    targets[s.name], sample_every, ex[s.name])))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sec.details["wall_s"] = time.monotonic() - t0
    finally:
        remove_tasks(c, list(holders.values()) + list(targets.values()))
    expect = {}
    for s in SHIMS:
        for name in (holders[s.name], targets[s.name]):
            rm[s.name].expect[(name, None)] = 128 + signal.SIGKILL
        expect |= rm[s.name].expect | ex[s.name].expect
    problems = rec.wait_checked(expect, timeout=60)
    rec.close()
    _rows(sec, rm, ex, problems, runs, execs)
    return sec


def _count(t: Tally, n: int) -> str:
    text = f"{t.done - t.wrong}/{n} right"
    if t.lost_output:
        text += f" ({t.lost_output} with the right exit code and their output lost)"
    if t.error:
        text += f"; stream died: {t.error}"
    return text


def _rows(sec: Section, rm: dict, ex: dict, problems: dict, runs: int, execs: int) -> None:
    g, p = "go", "python"
    prefix = {s.name: s.short + "-" for s in SHIMS}

    def bad_events(shim: str, execs_only: bool) -> list[str]:
        return [k for k in problems if k.startswith(prefix[shim]) and ("/" in k) == execs_only]

    streams = ((rm, runs, f"{runs} sequential `ctr run --rm`", "task events create/start/exit/delete", False,
                "`ctr run --rm`"),
               (ex, execs, f"{execs} execs into one task", "exec events exec-added/exec-started/exit", True,
                "`ctr task exec`"))
    for tallies, n, what, events, execs_only, cmd in streams:
        ok = {s: not tallies[s].wrong and tallies[s].done == n and not tallies[s].error for s in (g, p)}
        sec.judged(f"{what} (exit 0–125, SIGKILL→137, SIGTERM→143): exit code + output",
                   ok[g], ok[p], _count(tallies[g], n), _count(tallies[p], n))
        ev = {s: bad_events(s, execs_only) for s in (g, p)}
        sec.judged(f"{events} once, in order, right status", not ev[g], not ev[p],
                   _bad(ev[g], problems), _bad(ev[p], problems))
        sec.measured(f"{cmd} wall time, median", _med(tallies[g].times), _med(tallies[p].times), ms)
    fds = {s: [x["fds"] for x in ex[s].samples if x.get("fds") is not None] for s in (g, p)}
    fd_ok = {s: len(fds[s]) >= 2 and fds[s][-1] <= fds[s][min(1, len(fds[s]) - 1)] + 2 for s in (g, p)}
    sec.judged("exec target's shim fds: start → after first window → end (leak: > +2 after the first window)",
               fd_ok[g], fd_ok[p], " → ".join(map(str, _ends(fds[g]))), " → ".join(map(str, _ends(fds[p]))))
    for key, label in (("uss", "USS (private)"), ("pss", "Pss")):
        slope = {s: growth_per_1000(ex[s].samples, key) for s in (g, p)}
        sec.measured(f"exec target's shim {label} growth per 1000 execs (slope after the first window)",
                     slope[g], slope[p], _kib)
        ends = {s: " → ".join(mib(x.get(key)) for x in (ex[s].samples[:1] + ex[s].samples[-1:])) for s in (g, p)}
        sec.text(f"exec target's shim {label}: start → end", ends[g], ends[p])
    for s in (g, p):
        sec.details[s] = {"run_rm": _detail(rm[s]), "exec": _detail(ex[s]) | {"samples": ex[s].samples}}
    sec.details["event_problems"] = dict(list(problems.items())[:50])
    sec.details["event_problem_count"] = len(problems)


def _ends(v: list[int]) -> list[int]:
    return v if len(v) <= 3 else [v[0], v[1], v[-1]]


def _bad(keys: list[str], problems: dict) -> str:
    if not keys:
        return "all right"
    return f"{len(keys)} wrong, e.g. {keys[0]}: {'; '.join(problems[keys[0]])}"


def _med(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


def _kib(v: float | None) -> str:
    return "—" if v is None else f"{v / 1024:+.0f} KiB"


def _detail(t: Tally) -> dict:
    return {"done": t.done, "wrong": t.wrong, "lost_output": t.lost_output, "first_wrong": t.first_wrong, "error": t.error,
            "median_s": _med(t.times), "max_s": max(t.times) if t.times else None}
