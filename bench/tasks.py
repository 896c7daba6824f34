"""ctr helpers shared by the benchmarks: parallel runs, detached tasks, teardown."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from integration.harness import Containerd, wait_for

from . import procs
from .shims import BY_NAME, VARIANTS, runtime_args

#: the variants of this run, in column order: go, python, python-ns[, rust] (bench/shims.py)
SHIMS = tuple(v.name for v in VARIANTS)
SHORT = {v.name: v.short for v in VARIANTS}  # container id tags: never equal for two variants
SLEEP_ARGV = ("sleep", "86400")

T = TypeVar("T")
R = TypeVar("R")

_t0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class CtrFailed(RuntimeError):
    pass


def task_id(prefix: str, shim: str, i: int | str) -> str:
    return f"{prefix}-{SHORT[shim]}-{i}"


def interleaved(n: int, prefix: str, shims: Iterable[str] = SHIMS) -> list[tuple[str, str]]:
    """[(shim, id)] alternating shims: go-0, python-0, go-1, python-1, ..."""
    shims = list(shims)
    return [(s, task_id(prefix, s, i)) for i in range(n) for s in shims]


def alternate(i: int, shims: Iterable[str] = SHIMS) -> list[str]:
    """Shim order for round ``i``, so that no shim always goes first or last.

    Two shims: AB BA BA AB ...; more: rotated by ``i // 2``, reversed on odd rounds
    (ABC CBA BCA ACB CAB BAC ...).
    """
    shims = list(shims)
    k = (i // 2) % len(shims) if shims else 0
    order = shims[k:] + shims[:k]
    return order if i % 2 == 0 else order[::-1]


def parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads, order kept.

    The first exception (or a KeyboardInterrupt in the caller) cancels what has
    not started yet; calls already running finish (ctr calls have timeouts).
    """
    items = list(items)
    if not items:
        return []
    ex = ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))))
    try:
        futures = [ex.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def ctr_ok(c: Containerd, *args: str, timeout: float = 120) -> str:
    r = c.ctr(*args, check=False, timeout=timeout)
    if r.returncode != 0:
        raise CtrFailed(f"ctr {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def runtime(c: Containerd, shim: str) -> list[str]:
    """``--runtime ...`` (plus ``--runtime-config-path``, namespace mode) for ``ctr run``."""
    return runtime_args(c.dir, BY_NAME[shim])


def run_detached(c: Containerd, ref: str, shim: str, cid: str, argv: Iterable[str] = SLEEP_ARGV) -> float:
    """``ctr run -d``; returns its wall time."""
    t0 = time.perf_counter()
    ctr_ok(c, "run", "-d", *runtime(c, shim), ref, cid, *argv)
    return time.perf_counter() - t0


def wait_running(c: Containerd, ids: Iterable[str], timeout: float = 120) -> None:
    ids = set(ids)

    def not_running() -> set[str]:
        tasks = c.tasks()
        return {i for i in ids if tasks.get(i, {}).get("status") != "RUNNING"}

    wait_for(lambda: not not_running(), timeout=timeout, interval=0.2,
             message=lambda: f"tasks RUNNING (not yet: {sorted(not_running())[:10]})")


def remove(c: Containerd, ids: Iterable[str], workers: int = 4) -> None:
    """Kill + delete tasks and containers; then check they are gone."""
    ids = sorted(set(ids))
    if not ids:
        return
    tasks = c.tasks()
    parallel(lambda i: c.ctr("task", "rm", "-f", i, check=False, timeout=60),
             [i for i in ids if i in tasks], workers)
    present = sorted(c.containers() & set(ids))
    for k in range(0, len(present), 50):
        c.ctr("containers", "rm", *present[k:k + 50], check=False, timeout=60)
    # stragglers: the harness's slower but thorough path
    left = (set(c.tasks()) | c.containers()) & set(ids)
    for i in sorted(left):
        c.remove_container(i)
    left = (set(c.tasks()) | c.containers()) & set(ids)
    if left:
        raise CtrFailed(f"could not remove {sorted(left)}")


#: Peers' shims still alive when their tasks were gone (found by wait_no_shims, then killed):
#: a finding for that column, in the report; never a reason to drop the other columns.
PEER_LEFTOVERS: list[dict] = []
OWN_FAMILY = "python"


def wait_no_shims(c: Containerd, timeout: float = 30, peer_grace: float = 5) -> None:
    """Every shim of our containerd has exited (the check between rounds).

    A warm template (python) is not a shim: it outlives its tasks by design. One of
    our shims left behind fails the run. A peer's (the Go or Rust shim's) still alive
    after ``peer_grace`` is recorded in PEER_LEFTOVERS and killed by its pid, and the
    run goes on: its leak is a finding for its column (the Rust shim of 2026-05, for
    one, stays alive after an exec'd task is deleted).
    """
    def alive() -> dict[str, list[int]]:
        return {f: p for f, p in procs.family_pids(c.address, templates=False).items() if p}

    deadline = time.monotonic() + peer_grace
    wait_for(lambda: OWN_FAMILY not in alive() and (time.monotonic() > deadline or not alive()),
             timeout=timeout, interval=0.1, message=lambda: f"shims to exit (left: {alive()})")
    for family, pids in alive().items():
        log(f"{family} shim(s) {pids} still alive after their tasks were deleted: killed, reported")
        PEER_LEFTOVERS.append({"family": family, "pids": pids, "at": time.monotonic() - _t0})
        procs.kill_pids(pids)
    wait_for(lambda: not alive(), timeout=timeout, interval=0.1,
             message=lambda: f"leftover peer shims to die (left: {alive()})")


def summary(samples: list[float]) -> dict:
    """median/p90/min/max/mean of a list of seconds (plus the samples)."""
    s = sorted(samples)
    p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) >= 2 else s[0]
    return {"n": len(s), "median_s": statistics.median(s), "p90_s": p90,
            "min_s": s[0], "max_s": s[-1], "mean_s": statistics.fmean(s), "samples_s": samples}
