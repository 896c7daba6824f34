"""Latency: ``ctr run --rm``, ``ctr run -d``, ``ctr task exec``, a burst of ``ctr run -d``, ttrpc State.

Every comparison alternates the shims (go, python, python-ns, then python-ns,
python, go, ...: ``tasks.alternate``) so that drift on the machine hits all alike.

One detached ``sleep`` task per variant stays up while ``run --rm``, ``run -d``,
exec and State are measured: exec and State need a task, and namespace mode is
measured in its steady state, a shim already serving the namespace, so that a
new task's start costs no process start.  (Container-mode shims are one per
task: a resident task changes nothing for the next one.)  The burst starts from
no shim at all for every variant.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import AsyncExitStack, contextmanager

import trio

from integration.harness import Containerd

from .procs import socket_owners
from .tasks import (
    SHIMS,
    alternate,
    ctr_ok,
    interleaved,
    log,
    parallel,
    remove,
    run_detached,
    runtime,
    summary,
    task_id,
    wait_no_shims,
    wait_running,
)

TASK_SERVICE = "containerd.task.v2.Task"
NAMESPACE_HEADER = "containerd-namespace-ttrpc"


def run_rm_once(c: Containerd, ref: str, shim: str, cid: str) -> float:
    t0 = time.perf_counter()
    ctr_ok(c, "run", "--rm", *runtime(c, shim), ref, cid, "/bin/true")
    return time.perf_counter() - t0


def run_rm(c: Containerd, ref: str, runs: int) -> dict:
    """``ctr run --rm IMG ID /bin/true``: runs per shim, interleaved (1 warm-up each, not counted)."""
    for shim in SHIMS:
        run_rm_once(c, ref, shim, task_id("rm-warm", shim, 0))
    times: dict[str, list[float]] = {s: [] for s in SHIMS}
    for i in range(runs):
        for shim in alternate(i):
            times[shim].append(run_rm_once(c, ref, shim, task_id("rm", shim, i)))
    return {s: summary(t) for s, t in times.items()}


def start(c: Containerd, ref: str, runs: int) -> dict:
    """``ctr run -d IMG ID sleep``: the start of a task, up to RUNNING, one at a time, interleaved.

    The started tasks stay up until all samples are taken (a namespace-mode shim
    serves more and more tasks, as it would on a host), then are removed.
    """
    times: dict[str, list[float]] = {s: [] for s in SHIMS}
    ids: list[str] = []
    try:
        for i in range(runs):
            for shim in alternate(i):
                ids.append(task_id("start", shim, i))
                times[shim].append(run_detached(c, ref, shim, ids[-1]))
    finally:
        remove(c, ids, workers=4)
    return {s: summary(t) for s, t in times.items()}


def exec_latency(c: Containerd, ids: dict[str, str], runs: int) -> dict:
    """``ctr task exec --exec-id X ID /bin/true`` against a running task per shim."""
    def once(shim: str, exec_id: str) -> float:
        t0 = time.perf_counter()
        ctr_ok(c, "task", "exec", "--exec-id", exec_id, ids[shim], "/bin/true")
        return time.perf_counter() - t0

    out: dict = {}
    times: dict[str, list[float]] = {s: [] for s in SHIMS}
    errors: dict[str, str] = {}
    for shim in SHIMS:  # warm-up; a shim that cannot exec is reported, not fatal
        try:
            once(shim, "warm")
        except Exception as e:  # noqa: BLE001
            errors[shim] = str(e)
    for i in range(runs):
        for shim in alternate(i):
            if shim not in errors:
                times[shim].append(once(shim, f"x{i}"))
    for shim in SHIMS:
        out[shim] = {"error": errors[shim]} if shim in errors else summary(times[shim])
    return out


def burst(c: Containerd, ref: str, n: int, reps: int) -> dict:
    """Wall time of ``n`` concurrent ``ctr run -d`` (one thread each) per shim, then clean up."""
    walls: dict[str, list[float]] = {s: [] for s in SHIMS}
    per_call: dict[str, list[float]] = {s: [] for s in SHIMS}
    for rep in range(reps):
        for shim in alternate(rep):
            plan = [(shim, task_id("burst", shim, f"{rep}-{i}")) for i in range(n)]
            ids = [cid for _, cid in plan]
            wait_no_shims(c)
            try:
                t0 = time.perf_counter()
                calls = parallel(lambda p: run_detached(c, ref, p[0], p[1]), plan, n)
                walls[shim].append(time.perf_counter() - t0)
                per_call[shim] += calls
                wait_running(c, ids)
            finally:
                remove(c, ids, workers=4)
            log(f"latency: burst of {n} ctr run -d, {shim}: {walls[shim][-1]:.2f} s")
    return {s: {"concurrency": n, "reps": reps, "wall_s": walls[s],
                "median_wall_s": statistics.median(walls[s]),
                "per_call": summary(per_call[s])} for s in SHIMS}


def _threads(pids: Iterable[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            pass
    return out


def _cpu_ns(pids: Iterable[int]) -> int:
    """Time on a CPU of every live thread of ``pids`` (schedstat, ns): all of a Go shim's runtime
    threads count, their spinning included. A thread that ends between two reads takes its
    time with it; no shim's thread ends while State is measured."""
    total = 0
    for tid in _threads(pids):
        try:
            with open(f"/proc/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


@contextmanager
def _one_cpu(pids: Iterable[int]) -> Iterator[None]:
    """Run the shims' threads and the calling thread (the State client) on one CPU, then give
    every thread back its mask. Without it, a single-threaded shim is woken on the CPU it slept
    on, the other one from the client's, and the round trip is mostly that wakeup and caches
    gone cold meanwhile: with it the row measures what the shim itself does per call."""
    pids = list(pids)
    cpu = min(os.sched_getaffinity(0))
    saved = {tid: os.sched_getaffinity(tid) for tid in _threads(pids)}
    mine = os.sched_getaffinity(0)
    try:
        for tid in saved:
            os.sched_setaffinity(tid, {cpu})
        os.sched_setaffinity(0, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, mine)
        for tid in _threads(pids):  # a thread started meanwhile inherited {cpu}: it gets the process's mask
            try:
                os.sched_setaffinity(tid, saved.get(tid, mine))
            except OSError:
                pass


async def _state_calls(addresses: dict[str, tuple[str, str]], namespace: str, n: int, chunk: int,
                       pids: dict[str, set[int]] | None = None) -> dict:
    """``n`` State calls per shim in chunks, shims alternating; with ``pids`` ({shim: its
    processes}), also each shim's CPU time over its calls (``cpu_s``)."""
    from shim.proto import shim_pb2
    from shim.ttrpc import open_client

    samples: dict[str, list[float]] = {s: [] for s in addresses}
    cpu_ns: dict[str, int] = dict.fromkeys(addresses, 0)
    status: dict[str, int] = {}
    meta = [(NAMESPACE_HEADER, namespace)]  # as containerd sends it
    async with AsyncExitStack() as stack:
        clients = {s: await stack.enter_async_context(open_client(addr)) for s, (addr, _) in addresses.items()}
        payloads = {s: shim_pb2.StateRequest(id=cid).SerializeToString() for s, (_, cid) in addresses.items()}
        for shim, client in clients.items():  # warm-up + sanity check
            for _ in range(20):
                reply = shim_pb2.StateResponse.FromString(
                    await client.call(TASK_SERVICE, "State", payloads[shim], metadata=meta, timeout=10))
            status[shim] = reply.status
        done, k = 0, 0
        while done < n:
            m = min(chunk, n - done)
            for shim in alternate(k, list(clients)):
                client, payload, out = clients[shim], payloads[shim], samples[shim]
                before = _cpu_ns(pids[shim]) if pids else 0
                for _ in range(m):
                    t0 = time.perf_counter()
                    await client.call(TASK_SERVICE, "State", payload, metadata=meta, timeout=10)
                    out.append(time.perf_counter() - t0)
                if pids:
                    cpu_ns[shim] += _cpu_ns(pids[shim]) - before
            done += m
            k += 1
    return {"samples": samples, "status": status, "cpu_s": {s: ns / 1e9 for s, ns in cpu_ns.items()}}


def ttrpc_state(c: Containerd, ids: dict[str, str], n: int, chunk: int = 50) -> dict:
    """N direct ``Task/State`` round trips per shim over its ttrpc socket (our trio client), and
    the shim's CPU time per call; then N more with the client and every shim on one CPU."""
    addresses = {}
    for shim, cid in ids.items():
        addr = (c.bundle_dir / cid / "address").read_text().strip()
        addresses[shim] = (addr, cid)
    owners = socket_owners({a.removeprefix("unix://") for a, _ in addresses.values()})
    pids = {shim: owners.get(a.removeprefix("unix://"), set()) for shim, (a, _) in addresses.items()}
    r = trio.run(_state_calls, addresses, c.namespace, n, chunk, pids)
    with _one_cpu(set().union(*pids.values())):
        one = trio.run(_state_calls, addresses, c.namespace, n, chunk, pids)
    out = {}
    for shim in SHIMS:
        s = summary(r["samples"][shim])
        s["address"] = addresses[shim][0]
        s["task_status"] = r["status"][shim]  # 2 = RUNNING
        s["cpu_per_call_s"] = r["cpu_s"][shim] / n if pids[shim] else None
        s["one_cpu"] = summary(one["samples"][shim])
        s["one_cpu"]["cpu_per_call_s"] = one["cpu_s"][shim] / n if pids[shim] else None
        out[shim] = s
    return out


def run(c: Containerd, ref: str, runs: int, burst_n: int, burst_reps: int, state_calls: int) -> dict:
    out: dict = {}
    plan = interleaved(1, "lat")  # the resident task of each variant
    ids = dict(plan)
    try:
        for shim, task in plan:
            run_detached(c, ref, shim, task)
        wait_running(c, ids.values())
        log(f"latency: ctr run --rm /bin/true x{runs} per shim")
        out["run_rm"] = run_rm(c, ref, runs)
        _log_pair("run --rm", out["run_rm"])
        log(f"latency: ctr run -d sleep x{runs} per shim")
        out["start"] = start(c, ref, runs)
        _log_pair("run -d", out["start"])
        log(f"latency: ctr task exec /bin/true x{runs} per shim")
        out["exec"] = exec_latency(c, ids, runs)
        _log_pair("exec", out["exec"])
        log(f"latency: ttrpc Task/State x{state_calls} per shim")
        out["ttrpc_state"] = ttrpc_state(c, ids, state_calls)
        _log_pair("State", out["ttrpc_state"])
    finally:
        remove(c, ids.values())
        wait_no_shims(c)

    log(f"latency: burst of {burst_n} concurrent ctr run -d, {burst_reps} rep(s) per shim")
    out["burst"] = burst(c, ref, burst_n, burst_reps)
    return out


def _log_pair(name: str, d: dict) -> None:
    parts = []
    for s in SHIMS:
        v = d.get(s, {})
        parts.append(f"{s} {v['median_s'] * 1000:.2f} ms" if "median_s" in v else f"{s} error")
    log(f"latency:   {name} median: " + ", ".join(parts))
