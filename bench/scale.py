"""Scale: namespace mode with N tasks in one shim vs N Go shims (issue 16), on request only.

    python -m bench --only scale --scale-tasks 1000 [--idle-window 60]

The bench's containerd starts our shim under a 1024 soft RLIMIT_NOFILE (the
harness's ``shim_nofile``), as containerd 2.x started by systemd would; the Go
shim raises its own limit at start, ours must too.  Each variant (python-ns, then
go) gets a round of its own, from no shim at all, so Pss is not split with the
other's processes:

1. one task; ``State`` round trips (ttrpc, our client) and ``ctr task exec`` on it:
   the latency at 1 task;
2. N - 1 more tasks, ``--concurrency`` ``ctr run -d`` at a time: the start rate;
3. all RUNNING: Pss (smaps_rollup), open fds and the processes of the variant;
   CPU ticks (utime + stime, /proc/PID/stat) of those processes over the idle
   window; the same ``State`` and exec measurements on the first task again: the
   latency at N tasks;
4. SIGKILL to every task's init process at once (os.kill, no ctr in between),
   with a ``ctr events`` stream recording: every ``/tasks/exit`` delivered, and
   the time from the first kill to the arrival of the last;
5. every task and container deleted; no shim process of the family left.

The pure parts (``cpu_ticks``, ``exit_times``, ``verdicts``, ``rows``) are unit
tested in tests/test_bench_scale.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import trio

from integration.ctr_events import EventStream
from integration.harness import Containerd, wait_for

from . import procs
from .latency import _state_calls
from .shims import BY_NAME
from .tasks import ctr_ok, log, parallel, remove, run_detached, summary, task_id, wait_no_shims, wait_running

VARIANTS = ("python-ns", "go")
SOFT_NOFILE = 1024  # containerd 2.x's shims under systemd's default
EXEC_RUNS = 10
#: the issue's targets
PSS_RATIO_MAX = 0.02
STATE_P90_RATIO_MAX = 2.0


# -- /proc readers -------------------------------------------------------------------------------

def cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from one ``/proc/PID/stat`` line (the comm may hold spaces)."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the line; [0] is field 3


def read_ticks(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile(pid: int) -> tuple[str, str] | None:
    """(soft, hard) open-file limit of pid as /proc shows it."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    except OSError:
        pass
    return None


# -- pure summaries --------------------------------------------------------------------------------

def exit_times(arrivals: list[tuple[str, float]], ids: set[str], t0: float) -> dict:
    """From (container id, arrival time) of ``/tasks/exit`` events: how many of ``ids``
    got one, duplicates, and the seconds from ``t0`` to the first and the last."""
    first: dict[str, float] = {}
    dup = 0
    for cid, at in arrivals:
        if cid not in ids:
            continue
        if cid in first:
            dup += 1
        else:
            first[cid] = at
    times = sorted(first.values())
    return {"expected": len(ids), "delivered": len(first), "duplicates": dup,
            "missing": sorted(ids - set(first))[:10],
            "first_s": times[0] - t0 if times else None, "last_s": times[-1] - t0 if times else None}


def pss_by_kind(rows: list[dict]) -> dict[str, int]:
    """Pss summed per process kind (``shim``, ``template``) from ``procs.measure`` rows:
    how much of a python sum is the warm template."""
    out: dict[str, int] = {}
    for row in rows:
        out[row["kind"]] = out.get(row["kind"], 0) + row["pss"]
    return out


def verdicts(r: dict) -> list[dict]:
    """The issue's targets against one scale result ({"tasks": n, "python-ns": ..., "go": ...})."""
    n = r["tasks"]
    ns, go = r.get("python-ns") or {}, r.get("go") or {}
    out = []

    def judge(target: str, ok: bool | None, measured: str) -> None:
        out.append({"target": target, "ok": ok, "measured": measured})

    running = ns.get("running")
    judge(f"{n} tasks in one shim started under a {SOFT_NOFILE} soft NOFILE limit: all run",
          None if running is None else running == n and ns.get("shims") == 1,
          f"{running} running, {ns.get('shims')} shim process(es), started with soft limit "
          f"{ns.get('launcher_soft_nofile')}, shim now at {ns.get('nofile')}")
    pss_ns, pss_go = _get(ns, "pss"), _get(go, "pss")
    ratio = pss_ns / pss_go if pss_ns is not None and pss_go else None
    judge(f"Pss ≤ {PSS_RATIO_MAX}× the {n} Go shims", None if ratio is None else ratio <= PSS_RATIO_MAX,
          "—" if ratio is None else f"{pss_ns / 2**20:.1f} MiB vs {pss_go / 2**20:.1f} MiB = {ratio:.4f}×")
    cpu_ns, cpu_go = ns.get("idle_cpu_s"), go.get("idle_cpu_s")
    judge("idle CPU ≤ Go's", None if cpu_ns is None or cpu_go is None else cpu_ns <= cpu_go,
          f"{cpu_ns} s vs {cpu_go} s over {r.get('idle_window_s')} s")
    p1, pn = _get(ns, "state_1", "p90_s"), _get(ns, "state_n", "p90_s")
    sr = pn / p1 if p1 and pn is not None else None
    judge(f"State p90 at {n} tasks ≤ {STATE_P90_RATIO_MAX:g}× its p90 at 1 task",
          None if sr is None else sr <= STATE_P90_RATIO_MAX,
          "—" if sr is None else f"{pn * 1e6:.0f} µs vs {p1 * 1e6:.0f} µs = {sr:.2f}×")
    ev_ns, ev_go = ns.get("exits") or {}, go.get("exits") or {}
    last_ns, last_go = ev_ns.get("last_s"), ev_go.get("last_s")
    all_ns = ev_ns.get("delivered") == n and not ev_ns.get("duplicates")
    judge(f"kill -9 of all → {n} exit events, the last no later than Go's last",
          None if last_ns is None or last_go is None else all_ns and last_ns <= last_go,
          f"{ev_ns.get('delivered')} events ({ev_ns.get('duplicates')} duplicate), last after "
          f"{_s(last_ns)}; Go: {ev_go.get('delivered')}, last after {_s(last_go)}")
    left = {v: (r.get(v) or {}).get("left") for v in VARIANTS}
    judge("nothing left after deletion", all(x == [] for x in left.values()),
          "; ".join(f"{v}: {x or 'nothing'}" for v, x in left.items()))
    return out


def _get(d: dict, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d  # type: ignore[return-value]


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def rows(r: dict) -> list[tuple[str, dict[str, float | None], str]]:
    """Report rows (metric, {variant: value}, kind) as bench/report.py prints them."""
    n = r["tasks"]
    vs = [v for v in VARIANTS if isinstance(r.get(v), dict)]

    def each(*keys: str) -> dict[str, float | None]:
        return {v: _get(r[v], *keys) for v in vs}

    return [
        (f"scale, {n} tasks: Pss sum", each("pss"), "mem"),
        (f"scale, {n} tasks: open fds (all shim processes)", each("fds"), "n"),
        (f"scale, {n} tasks: shim processes", each("shims"), "n"),
        (f"scale, {n} tasks: idle CPU over {r['idle_window_s']:g} s", each("idle_cpu_s"), "s"),
        (f"scale: start rate ({r['concurrency']} `ctr run -d` at a time)", each("start_rate"), "rate"),
        ("scale: ttrpc `Task/State` p90 at 1 task", each("state_1", "p90_s"), "us"),
        (f"scale: ttrpc `Task/State` p90 at {n} tasks", each("state_n", "p90_s"), "us"),
        ("scale: `ctr task exec` median at 1 task", each("exec_1", "median_s"), "ms"),
        (f"scale: `ctr task exec` median at {n} tasks", each("exec_n", "median_s"), "ms"),
        (f"scale: kill -9 of all {n} → exit events delivered", each("exits", "delivered"), "n"),
        ("scale: kill -9 of all → last exit event after", each("exits", "last_s"), "s"),
    ]


def verdict_lines(r: dict) -> list[str]:
    """Markdown: the targets of issue 16, each PASS/FAIL with what was measured."""
    head = (f"Scale ({r['tasks']} tasks; our shim started under a soft NOFILE limit of "
            f"{(r.get('shim_nofile') or ['?'])[0]}; each variant in a round of its own):")
    marks = {True: "PASS", False: "FAIL", None: "n/a"}
    return [head, "", *(f"- {marks[v['ok']]}: {v['target']} — {v['measured']}" for v in r.get("verdicts") or [])]


# -- the round -------------------------------------------------------------------------------------

class TimedEvents(EventStream):
    """``ctr events`` with the arrival time of each ``/tasks/exit`` (read as lines arrive)."""

    def exits(self) -> list[tuple[str, float]]:
        return [(e.body.get("container_id", ""), e.at) for e in self.snapshot()
                if e.topic == "/tasks/exit" and e.body.get("id") == e.body.get("container_id")]


def _state(c: Containerd, cid: str, calls: int) -> dict:
    addr = (c.bundle_dir / cid / "address").read_text().strip()
    r = trio.run(_state_calls, {"v": (addr, cid)}, c.namespace, calls, 50)
    return summary(r["samples"]["v"]) | {"task_status": r["status"]["v"]}


def _exec(c: Containerd, cid: str, tag: str) -> dict:
    times = []
    for i in range(EXEC_RUNS + 1):
        t0 = time.perf_counter()
        ctr_ok(c, "task", "exec", "--exec-id", f"{tag}{i}", cid, "/bin/true")
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return summary(times)


def _launcher_soft_limit(c: Containerd) -> str | None:
    """The soft limit the harness's wrapper starts our launcher with (None: no wrapper)."""
    return str(c.shim_nofile[0]) if c.shim_nofile else None


def shims_left(c: Containerd, timeout: float) -> dict[str, list[int]]:
    """{family: pids} of shims (not templates) of our containerd still alive after ``timeout``."""
    def alive() -> dict[str, list[int]]:
        return {f: p for f, p in procs.family_pids(c.address, templates=False).items() if p}
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not alive(), timeout=timeout, interval=0.2, message="shims to exit")
    return alive()


def one_round(c: Containerd, ref: str, variant: str, n: int, concurrency: int, window: float,
              state_calls: int) -> dict:
    family = BY_NAME[variant].family
    ids = [task_id("scale", variant, i) for i in range(n)]
    wait_no_shims(c)
    procs.stop_templates(c.address)
    out: dict = {"tasks": n}
    events: TimedEvents | None = None
    killed_at = 0.0
    try:
        run_detached(c, ref, variant, ids[0])
        wait_running(c, ids[:1])
        out["state_1"] = _state(c, ids[0], state_calls)
        out["exec_1"] = _exec(c, ids[0], "one")
        log(f"scale: {variant}: 1 task, State p90 {out['state_1']['p90_s'] * 1e6:.0f} µs; starting {n - 1} more")
        t0 = time.monotonic()
        failures: list[str] = []

        def start(cid: str) -> None:
            try:
                run_detached(c, ref, variant, cid)
            except Exception as e:  # noqa: BLE001 - counted: "all run" is a target, not an assumption
                failures.append(f"{cid}: {e}")
        parallel(start, ids[1:], concurrency)
        out["start_wall_s"] = time.monotonic() - t0
        out["start_rate"] = (n - 1) / out["start_wall_s"] if n > 1 else None
        out["start_failures"] = failures[:10]
        out["start_failed"] = len(failures)
        wait_running(c, [i for i in ids if not any(f.startswith(i + ":") for f in failures)], timeout=120 + n)
        tasks = c.tasks()
        out["running"] = sum(tasks.get(i, {}).get("status") == "RUNNING" for i in ids)
        a = procs.variant_procs(c.address, c.bundle_dir, {variant: (family, ids)})[variant]
        pids = sorted(a["procs"])
        m = procs.measure(a["procs"])
        out.update(pss=m["sum"]["pss"], rss=m["sum"]["rss"], uss=m["sum"]["uss"], processes=m["count"],
                   pss_by_kind=pss_by_kind(m["processes"]),
                   shims=a["serving"], templates=m["templates"], fds=sum(fd_count(p) for p in pids),
                   launcher_soft_nofile=_launcher_soft_limit(c) if family == "python" else None,
                   nofile=sorted({"/".join(x) for p, k in a["procs"].items() if k == "shim" and (x := nofile(p))}))
        log(f"scale: {variant}: {out['running']}/{n} running in {out['start_wall_s']:.1f} s, "
            f"Pss {out['pss'] / 2**20:.1f} MiB, {out['fds']} fds, {out['shims']} shim(s); idle {window:g} s")
        before = read_ticks(pids)
        time.sleep(window)  # the measurement itself: nothing happens on purpose
        after = read_ticks(pids)
        ticks = sum(after[p] - before[p] for p in before if p in after)
        out.update(idle_ticks=ticks, idle_cpu_s=ticks / os.sysconf("SC_CLK_TCK"), idle_window_s=window)
        out["state_n"] = _state(c, ids[0], state_calls)
        out["exec_n"] = _exec(c, ids[0], "many")
        log(f"scale: {variant}: idle CPU {out['idle_cpu_s']:.2f} s, State p90 at {n}: "
            f"{out['state_n']['p90_s'] * 1e6:.0f} µs, exec median {out['exec_n']['median_s'] * 1e3:.0f} ms")
        events = TimedEvents(c)
        inits = {cid: int(t["pid"]) for cid, t in c.tasks().items() if cid in ids and t.get("pid", "0") != "0"}
        killed_at = time.monotonic()
        for pid in inits.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        want = set(inits)
        wait_for(lambda: exit_times(events.exits(), want, killed_at)["delivered"] == len(want), timeout=60 + n / 10,
                 interval=0.05, message="every exit event")
        out["exits"] = exit_times(events.exits(), want, killed_at)
        log(f"scale: {variant}: kill -9 of {len(want)}: {out['exits']['delivered']} exit events, "
            f"the last after {_s(out['exits']['last_s'])}")
    except TimeoutError as e:
        if events is not None and killed_at and "exits" not in out:
            out["exits"] = exit_times(events.exits(), set(ids), killed_at)
        out["error"] = str(e)
        log(f"scale: {variant}: {e}")
    finally:
        if events is not None:
            events.close()
        remove(c, ids, workers=concurrency)
        left = shims_left(c, timeout=60)  # before wait_no_shims, which kills a peer's leftovers
        left_tasks = sorted((set(c.tasks()) | c.containers()) & set(ids))
        out["left"] = ([f"{f} shims {p[:10]}" for f, p in left.items()]
                       + ([f"tasks/containers {left_tasks[:10]}"] if left_tasks else []))
        with contextlib.suppress(TimeoutError):
            wait_no_shims(c, timeout=60)
        procs.stop_templates(c.address)
    return out


def run(c: Containerd, ref: str, n: int, concurrency: int, window: float, state_calls: int) -> dict:
    """{"tasks": n, "python-ns": {...}, "go": {...}, "verdicts": [...]} (see the module docstring)."""
    r: dict = {"tasks": n, "idle_window_s": window, "concurrency": concurrency, "state_calls": state_calls,
               "shim_nofile": list(c.shim_nofile) if c.shim_nofile else None}
    for variant in VARIANTS:
        log(f"scale: {variant}, {n} tasks")
        r[variant] = one_round(c, ref, variant, n, concurrency, window, state_calls)
    r["verdicts"] = verdicts(r)
    for v in r["verdicts"]:
        log(f"scale: {'PASS' if v['ok'] else 'FAIL' if v['ok'] is False else 'n/a '} {v['target']}: {v['measured']}")
    return r
