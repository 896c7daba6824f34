"""Hostile clients on a shim's socket: many idle connections, and requests pipelined by a
client that never reads a reply.

Anyone with the shim's uid/gid can connect (root here). A shim serving containerd must not be
starved or blown up by such a peer: a State from containerd on its own connection must still be
answered within ``BOUND``, the shim's memory must stay bounded, and once the peer goes away its
fds must be released. Reported per shim: fds and Rss before, during and after.
"""

from __future__ import annotations

import contextlib
import select

from integration.harness import Containerd, pid_alive, wait_for

from shim.proto import shim_pb2

from .common import SHIMS, Ids, address_of, ctr_or_raise, fd_count, memory, mib, remove_tasks, run_args, serving_pid, wait_status
from .report import Section
from .wire import connect, request, state

BOUND = 1.0
STALL = 2.0  # the peer stops sending once the socket accepted nothing for this long


def _rss(pid: int) -> int | None:
    m = memory(pid)
    return m["rss"] if m else None


def _fds_back(pid: int, base: int | None) -> int | None:
    """fd count once it is back within 2 of ``base`` (or whatever it is after 15 s)."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: (fd_count(pid) or 0) <= (base or 0) + 2, timeout=15, interval=0.1, message="fds back")
    return fd_count(pid)


def idle_connections(path: str, pid: int, name: str, ns: str, n: int) -> dict:
    out: dict = {"fds_before": fd_count(pid), "rss_before": _rss(pid)}
    socks, refused = [], 0
    try:
        for _ in range(n):
            try:
                socks.append(connect(path, timeout=5))
            except OSError:
                refused += 1
        out["held"], out["refused"] = len(socks), refused
        out["state_code"], out["state_s"] = state(path, name, ns, timeout=10)
        out["fds_during"], out["rss_during"] = fd_count(pid), _rss(pid)
    finally:
        for s in socks:
            s.close()
    out["fds_after"], out["rss_after"] = _fds_back(pid, out["fds_before"]), _rss(pid)
    return out


def pipelined(path: str, pid: int, name: str, ns: str, n: int) -> dict:
    out: dict = {"fds_before": fd_count(pid), "rss_before": _rss(pid)}
    payload = shim_pb2.StateRequest(id=name).SerializeToString()
    frames = [request(2 * k + 1, "State", payload, ns) for k in range(n)]
    blob = b"".join(frames)
    s = connect(path)
    try:
        s.setblocking(False)
        sent = 0
        while sent < len(blob):
            try:
                sent += s.send(blob[sent:sent + (1 << 16)])
            except BlockingIOError:
                if not select.select([], [s], [], STALL)[1]:
                    break
            except OSError as e:
                out["send_error"] = str(e)
                break
        out["requests_taken"] = sent // len(frames[0])
        out["state_code"], out["state_s"] = state(path, name, ns, timeout=10)
        out["fds_during"], out["rss_during"] = fd_count(pid), _rss(pid)
    finally:
        s.close()
    out["fds_after"], out["rss_after"] = _fds_back(pid, out["fds_before"]), _rss(pid)
    return out


def run(c: Containerd, ids: Ids, n_conns: int, n_pipelined: int) -> Section:
    sec = Section("hostile clients")
    res: dict = {}
    names = {s.name: ids.new(s, "hostile") for s in SHIMS}
    try:
        for s in SHIMS:
            ctr_or_raise(c, "run", "-d", *run_args(s), c.image_ref, names[s.name], "sleep", "100000")
        wait_status(c, list(names.values()), "RUNNING")
        for s in SHIMS:
            name = names[s.name]
            path, pid = address_of(c, name), serving_pid(c, name)
            res[s.name] = {"idle": idle_connections(path, pid, name, c.namespace, n_conns),
                           "pipelined": pipelined(path, pid, name, c.namespace, n_pipelined)}
            code, t = state(path, name, c.namespace)
            res[s.name]["after"] = {"alive": pid_alive(pid), "state_code": code, "state_s": t}
    finally:
        remove_tasks(c, list(names.values()))
    _rows(sec, res, n_conns, n_pipelined)
    sec.details = res
    return sec


def _answered(r: dict) -> tuple[bool, str]:
    ok = r["state_code"] == 0 and r["state_s"] < BOUND
    return ok, f"{r['state_s'] * 1e3:.0f} ms" + ("" if r["state_code"] == 0 else f" (code {r['state_code']})")


def _rows(sec: Section, res: dict, n_conns: int, n_pipelined: int) -> None:
    g, p = res.get("go"), res.get("python")
    if not g or not p:
        return
    sec.text(f"{n_conns} idle connections: held / refused", *[f"{r['idle']['held']} / {r['idle']['refused']}" for r in (g, p)])
    (go_ok, go_t), (py_ok, py_t) = _answered(g["idle"]), _answered(p["idle"])
    sec.judged(f"… State on a new connection meanwhile < {BOUND:.0f} s", go_ok, py_ok, go_t, py_t)
    for key, label in (("idle", f"{n_conns} idle connections"), ("pipelined", f"{n_pipelined} pipelined requests")):
        fds = [r[key] for r in (g, p)]
        back = [f["fds_after"] is not None and f["fds_after"] <= (f["fds_before"] or 0) + 2 for f in fds]
        sec.judged(f"{label}: shim fds before → during → after the peer left (back?)", back[0], back[1],
                   *[f"{f['fds_before']} → {f['fds_during']} → {f['fds_after']}" for f in fds])
        sec.text(f"{label}: shim Rss before → during → after", *[
            f"{mib(f['rss_before'])} → {mib(f['rss_during'])} → {mib(f['rss_after'])}" for f in fds])
    sec.text(f"{n_pipelined} pipelined State requests, replies never read: requests the shim took in",
             *[str(r["pipelined"]["requests_taken"]) + (f" ({r['pipelined']['send_error']})"
                                                         if "send_error" in r["pipelined"] else "") for r in (g, p)])
    (go_ok, go_t), (py_ok, py_t) = _answered(g["pipelined"]), _answered(p["pipelined"])
    sec.judged(f"… State on another connection meanwhile < {BOUND:.0f} s", go_ok, py_ok, go_t, py_t)
    alive = [r["after"]["alive"] and r["after"]["state_code"] == 0 for r in (g, p)]
    sec.judged("shim alive and answering after both", alive[0], alive[1], *["yes" if a else "NO" for a in alive])
