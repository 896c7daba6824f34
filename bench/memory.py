"""Memory of the shims: 1 task and N detached ``sleep`` tasks per variant.

Per THP mode (the host policy is set before any shim of the round starts), for
each size: start ``size`` tasks per variant (interleaved, a few at a time), wait
until all are RUNNING, let them settle, sum Rss/Pss/USS over each variant's
processes, then delete everything and check that no shim is left before the
next round (a warm template of the python shim is stopped too, so every round
starts cold and its first python task pays for starting the template).

A variant's processes: those listening on the sockets its tasks' bundles name
(``procs.variant_procs``) plus, for the python variants, the template.

Two rounds per size:

* container mode: go, python (and rust) side by side in the same containerd, so
  they see the same host state;
* namespace mode: python-ns alone.  Its one shim is forked from the same template
  as container-mode shims; measured next to a hundred of them it would share the
  interpreter's pages with all of them, and Pss (which splits a shared page among
  its users) would charge it a hundredth of them.  Alone, it shares them with the
  template only, as on a host that runs namespace mode.

The two rounds alternate which goes first.
"""

from __future__ import annotations

import time

from integration.harness import Containerd

from . import procs
from .shims import BY_NAME
from .tasks import (
    SHIMS,
    interleaved,
    log,
    parallel,
    remove,
    run_detached,
    wait_no_shims,
    wait_running,
)
from .thp import ThpGuard


def round_groups(shims: tuple[str, ...] = SHIMS) -> list[list[str]]:
    """Variants measured together: every container-mode variant, then each namespace-mode one alone."""
    shared = [s for s in shims if not BY_NAME[s].namespace_mode]
    alone = [[s] for s in shims if BY_NAME[s].namespace_mode]
    return [g for g in [shared, *alone] if g]


def one_round(c: Containerd, ref: str, n: int, concurrency: int, settle: float, tag: str,
              shims: list[str]) -> dict:
    plan = interleaved(n, f"mem-{tag}", shims)
    ids = [cid for _, cid in plan]
    wait_no_shims(c)
    procs.stop_templates(c.address)
    t0 = time.monotonic()
    try:
        parallel(lambda p: run_detached(c, ref, p[0], p[1]), plan, concurrency)
        wait_running(c, ids, timeout=120 + n)
        started_s = time.monotonic() - t0
        time.sleep(settle)
        by_variant = {s: (BY_NAME[s].family, [cid for v, cid in plan if v == s]) for s in shims}
        attributed = procs.variant_procs(c.address, c.bundle_dir, by_variant)
        out: dict = {"tasks_per_shim": n, "start_wall_s": started_s, "shims": list(shims),
                     "unattributed": attributed["_unattributed"]}
        for shim in shims:
            a = attributed[shim]
            m = procs.measure(a["procs"])
            m.update(addresses=a["addresses"], serving=a["serving"], extra=a["extra"])
            if a["unserved"]:
                raise RuntimeError(f"{shim}: no process listens on the socket of {a['unserved'][:5]}")
            want = 1 if BY_NAME[shim].namespace_mode else n
            if a["addresses"] != want or a["serving"] != want:
                raise RuntimeError(f"{shim}: {n} tasks served on {a['addresses']} socket(s) by {a['serving']} "
                                   f"process(es), expected {want}")
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
    """{thp_mode: {"1": {variant: measurement, "rounds": [...]}, "N": ...}} (modes [] = current policy)."""
    results: dict = {}
    groups = round_groups()
    k = 0
    for mode in modes or [thp.current or "unknown"]:
        if modes:
            thp.set(mode)
        results[mode] = {}
        for n in sorted({1, tasks}):
            merged: dict = {"tasks_per_shim": n, "rounds": []}
            for group in (groups if k % 2 == 0 else groups[::-1]):
                what = "container mode" if not BY_NAME[group[0]].namespace_mode else "namespace mode"
                log(f"memory: THP={mode}, {n} task(s) per shim, {what}: {', '.join(group)}")
                r = one_round(c, ref, n, concurrency, settle, f"{mode[:2]}{n}", group)
                merged["rounds"].append({key: r[key] for key in ("shims", "start_wall_s", "unattributed")})
                for s in group:
                    merged[s] = r[s]
                log("memory:   " + ", ".join(
                    f"{s} Pss {r[s]['sum']['pss'] / 2**20:.1f} MiB ({r[s]['count']} procs)" for s in group))
                if r["unattributed"]:
                    log(f"memory:   not attributed to a variant: {r['unattributed']}")
            k += 1
            results[mode][str(n)] = merged
    return results
