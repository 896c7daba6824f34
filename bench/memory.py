"""Memory of the shim families: 1 task and N detached ``sleep`` tasks per shim.

Per THP mode (the host policy is set before any shim of the round starts):
for each size, start ``size`` tasks per shim (interleaved go/python, a few at
a time), wait until all are RUNNING, let them settle, sum Rss/Pss/USS over each
family, then delete everything and check that no shim is left before the next
round (a warm template of the python shim is stopped too, so every round starts
cold and its first python task pays for starting the template).  Both families
run side by side in the same containerd, so they see
the same host state.
"""

from __future__ import annotations

import time

from integration.harness import Containerd

from . import procs
from .tasks import SHIMS, interleaved, log, parallel, remove, run_detached, wait_no_shims, wait_running
from .thp import ThpGuard


def one_round(c: Containerd, ref: str, n: int, concurrency: int, settle: float, tag: str) -> dict:
    plan = interleaved(n, f"mem-{tag}")
    ids = [cid for _, cid in plan]
    wait_no_shims(c)
    procs.stop_templates(c.address)
    t0 = time.monotonic()
    try:
        parallel(lambda p: run_detached(c, ref, p[0], p[1]), plan, concurrency)
        wait_running(c, ids, timeout=120 + n)
        started_s = time.monotonic() - t0
        time.sleep(settle)
        fams = procs.family_procs(c.address)
        out = {"tasks_per_shim": n, "start_wall_s": started_s}
        for shim in SHIMS:
            m = procs.measure(fams[shim])
            if m["count"] - m["templates"] < n:
                raise RuntimeError(f"{shim}: {m['count'] - m['templates']} shim processes for {n} tasks")
            out[shim] = m
        return out
    finally:
        remove(c, ids, workers=concurrency)
        wait_no_shims(c)
        # every round starts cold: no warm template carried over from the last one
        killed = procs.stop_templates(c.address)
        if killed:
            log(f"memory:   stopped template process(es) {killed}")


def run(c: Containerd, ref: str, thp: ThpGuard, modes: list[str], tasks: int,
        concurrency: int, settle: float) -> dict:
    """{thp_mode: {"1": round, "N": round}} (modes [] = measure at the current policy)."""
    results: dict = {}
    for mode in modes or [thp.current or "unknown"]:
        if modes:
            thp.set(mode)
        results[mode] = {}
        for n in sorted({1, tasks}):
            log(f"memory: THP={mode}, {n} task(s) per shim")
            r = one_round(c, ref, n, concurrency, settle, f"{mode[:2]}{n}")
            results[mode][str(n)] = r
            log("memory:   " + ", ".join(
                f"{s} Pss {r[s]['sum']['pss'] / 2**20:.1f} MiB ({r[s]['count']} procs)" for s in SHIMS))
    return results
