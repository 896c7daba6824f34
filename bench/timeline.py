"""Timeline: one task's life, phase by phase, the Go shim beside this one.

The latency rows say *that* a start is slower; this says *where*. The bench
plays containerd itself, as the direct tests do (``integration.shim_driver.Lab``):
it runs ``<shim> start`` in a bundle, connects to the printed address, and calls
the task service while an events sink of its own receives the shim's events.
The same bundle layout, rootfs (an overlay over a busybox tree, as containerd's
overlayfs snapshotter hands it) and calls go to both shims, rounds alternating.

Phases of a round (wall time on the bench's side):

=============  ===========================================================
start          ``<shim> start`` exec'd -> address printed (launcher + shim up)
connect        ttrpc connection to that address
create         Create RPC (rootfs mount, fifos, ``runc create``)
start_rpc      Start RPC (``runc start``) -> reply
kill           Kill RPC (SIGKILL to the init)
exit_event     Kill's reply -> ``/tasks/exit`` received
delete         Delete RPC (``runc delete``, unmount)
shutdown       Shutdown RPC -> the shim process is gone
delete_action  ``<shim> delete`` (containerd 1.6 runs it after every shim exit)
=============  ===========================================================

For this shim, extra rounds run with ``-debug`` and the phases inside Create
and Start are read from its log (``shim.container``/``shim.runc`` debug lines,
µs timestamps): mount, stdio, options, ``runc create`` (and its spawn), the
pid file, the copiers, ``runc start``. Those rounds are not in the main table
(debug logging costs a little).

    python -m bench --only timeline [--timeline-rounds 15]
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from calendar import timegm
from pathlib import Path

import trio

from integration.harness import GO_SHIM_BINARY, PROJECT_BIN
from integration.shim_driver import (
    ADDRESS_RE,
    SHIM_SOCKET_DIR,
    Lab,
    Shim,
    listening_pids,
    make_rootfs_template,
    namespace_dirs,
)
from shim.launch.template_client import socket_path as template_socket_path
from shim.proto import mount_pb2

from .tasks import log, summary

PHASES = ("start", "connect", "create", "start_rpc", "kill", "exit_event", "delete", "shutdown", "delete_action")
PY_BINARY = str(PROJECT_BIN / "containerd-shim-runc-v2-py")
GO_BINARY = f"/usr/bin/{GO_SHIM_BINARY}"
VARIANTS = {"go": GO_BINARY, "python": PY_BINARY}

#: Inner phases of the Python shim: (name, the debug message that ends it); each starts where the
#: previous one ended, the first at the Create RPC's arrival ("<id>: create").
INNER = (
    ("mount", "rootfs mounted"),
    ("stdio", "stdio opened"),
    ("options", "options written"),
    ("runc_create", "runc create returned, pid file read"),
    ("copiers", "stdio copiers started"),
    ("created", "created, init pid"),
)
LINE_RE = re.compile(r'time="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})Z" level=debug msg="(.*?)" logger=')
RUNC_RE = re.compile(r"runc (\w+): ([\d.]+) ms \(spawn ([\d.]+) ms\)")


def _timestamp(date: str, micros: str) -> float:
    return timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%S")) + int(micros) / 1e6


def inner_phases(log_text: str, id: str) -> dict[str, float]:
    """Seconds per inner phase of one Create/Start, from a ``-debug`` shim's log (pure)."""
    marks: list[tuple[float, str]] = []
    out: dict[str, float] = {}
    for m in LINE_RE.finditer(log_text):
        ts, msg = _timestamp(m.group(1), m.group(2)), m.group(3)
        runc = RUNC_RE.fullmatch(msg)
        if runc:
            out.setdefault(f"runc {runc.group(1)} (wall)", float(runc.group(2)) / 1e3)
            out.setdefault(f"runc {runc.group(1)} (spawn)", float(runc.group(3)) / 1e3)
        elif msg.startswith(f"{id}: "):
            marks.append((ts, msg[len(id) + 2:]))
    begin = next((ts for ts, msg in marks if msg == "create"), None)
    if begin is None:
        return out
    for name, ending in INNER:
        end = next((ts for ts, msg in marks if msg.startswith(ending) and ts >= begin), None)
        if end is None:
            continue
        out[name] = end - begin
        begin = end
    return out


async def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(timeout):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


class TimelineLab(Lab):
    """A Lab whose ``start`` runs a chosen shim binary with the warm template allowed (the
    default path a containerd takes), optionally with ``-debug``."""

    def __init__(self, nursery: trio.Nursery, rootfs_template: Path) -> None:
        super().__init__(nursery, rootfs_template)
        self.binary = PY_BINARY
        self.debug = False

    def shim_argv(self, id: str, *rest: str, bundle: Path | None = None) -> list[str]:
        argv = super().shim_argv(id, *rest, bundle=bundle)
        argv[0] = self.binary
        if self.debug:
            argv.insert(1, "-debug")
        return argv

    async def timed_start(self, id: str, bundle: Path) -> tuple[float, str]:
        env = {**os.environ, "TTRPC_ADDRESS": self.events_path}
        for k in ("SHIM_CONFIG", "SHIM_PY_TEMPLATE", "SHIM_PY_GROUP"):
            env.pop(k, None)
        t0 = time.perf_counter()
        result = await trio.run_process(self.shim_argv(id, "start"), cwd=str(bundle), env=env, stdin=b"",
                                        capture_stdout=True, capture_stderr=True, check=False)
        elapsed = time.perf_counter() - t0
        self._track_shims(id)
        out = result.stdout.decode(errors="replace")
        if result.returncode != 0 or not ADDRESS_RE.fullmatch(out):
            raise RuntimeError(f"{self.binary} start failed ({result.returncode}): {out!r} {result.stderr!r}")
        self.socket_paths.add(out[len("unix://"):])
        return elapsed, out


def _overlay(lab: Lab, bundle: Path) -> list[mount_pb2.Mount]:
    upper, work = bundle / "upper", bundle / "work"
    upper.mkdir()
    work.mkdir()
    opts = [f"lowerdir={lab.template}", f"upperdir={upper}", f"workdir={work}"]
    return [mount_pb2.Mount(type="overlay", source="overlay", options=opts)]


async def one_round(lab: TimelineLab, sink, variant: str, i: int, *, debug: bool = False) -> dict[str, float]:
    """One task's whole life through one shim; seconds per phase (plus inner phases when debug)."""
    lab.binary, lab.debug = VARIANTS[variant], debug
    id = lab.new_id(f"tl{variant[:2]}{i}")
    bundle = lab.bundle(id, ["sleep", "600"], rootfs="empty")
    rootfs = _overlay(lab, bundle)
    t: dict[str, float] = {}
    t["start"], address = await lab.timed_start(id, bundle)
    pids = lab._track_shims(id)
    c0 = time.perf_counter()
    client = await lab.open_client(address)
    t["connect"] = time.perf_counter() - c0
    shim = Shim(id=id, bundle=bundle, address=address, socket_path=address[7:], pid=pids[0] if pids else 0,
                client=client, lab=lab)

    async def timed(name: str, coro) -> None:
        t0 = time.perf_counter()
        await coro
        t[name] = time.perf_counter() - t0

    seen = len(sink.events)
    await timed("create", shim.create(id, bundle, rootfs))
    await timed("start_rpc", shim.start(id))
    await timed("kill", shim.kill(id, signal.SIGKILL))
    k = time.perf_counter()
    with trio.fail_after(10):
        while not any(e.topic == "/tasks/exit" for e in sink.events[seen:]):
            await sink.changed.wait()
    t["exit_event"] = time.perf_counter() - k
    await timed("delete", shim.delete(id))
    pid = shim.pid or (lab._track_shims(id) or [0])[0]
    s0 = time.perf_counter()
    with contextlib.suppress(Exception):  # a shim may hang up as it exits
        await shim.shutdown(id)
    if pid:
        await _wait_gone(pid)
    t["shutdown"] = time.perf_counter() - s0
    d0 = time.perf_counter()
    await lab.run_delete(id, bundle)
    t["delete_action"] = time.perf_counter() - d0
    if debug:
        t.update(inner_phases(lab.shim_log(bundle), id))
    return t


def _stop_template(lab: Lab) -> None:
    """Our template for the lab's address, started by the first Python starts: ended by its pid,
    and the first start's mark removed."""
    path = template_socket_path(lab.containerd_address, SHIM_SOCKET_DIR)
    for pid in listening_pids(path) if os.path.exists(path) else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.unlink(path + ".wanted")


async def _run(rounds: int) -> dict:
    preexisting = {str(d) for d in namespace_dirs() if d.exists()}
    tmp = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    samples: dict[str, list[dict[str, float]]] = {"go": [], "python": [], "python-debug": []}
    try:
        template = make_rootfs_template(tmp / "rootfs")
        async with trio.open_nursery() as nursery:
            lab = TimelineLab(nursery, template)
            try:
                sink = await lab.start_sink()
                for variant in VARIANTS:  # warm-up, not counted: page cache, our template
                    await one_round(lab, sink, variant, -1)
                for i in range(rounds):
                    order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
                    for variant in order:
                        samples[variant].append(await one_round(lab, sink, variant, i))
                    samples["python-debug"].append(await one_round(lab, sink, "python", i, debug=True))
            finally:
                _stop_template(lab)
                problems = lab.cleanup()
                nursery.cancel_scope.cancel()
            if problems:
                log(f"timeline: cleanup problems: {problems}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in namespace_dirs():
            if str(d) not in preexisting:
                with contextlib.suppress(OSError):
                    d.rmdir()
    return samples


def _medians(rows: list[dict[str, float]]) -> dict[str, dict]:
    keys = sorted({k for r in rows for k in r})
    return {k: summary([r[k] for r in rows if k in r]) for k in keys}


def run(rounds: int) -> dict:
    log(f"timeline: {rounds} rounds per shim (+1 warm-up), alternating, plus {rounds} -debug rounds of ours")
    samples = trio.run(_run, rounds)
    result = {"rounds": rounds, "phases": list(PHASES),
              "by_variant": {v: _medians(rows) for v, rows in samples.items()}}
    go, py = result["by_variant"]["go"], result["by_variant"]["python"]
    for phase in PHASES:
        log(f"timeline: {phase:14s} go {go[phase]['median_s'] * 1e3:7.2f} ms   "
            f"python {py[phase]['median_s'] * 1e3:7.2f} ms")
    return result


def table(result: dict) -> list[str]:
    """Markdown rows: the phases (Go, Python, ratio), then the Python shim's inner phases."""
    go, py, dbg = (result["by_variant"][v] for v in ("go", "python", "python-debug"))
    lines = ["| phase | Go median | Go p90 | Python median | Python p90 | Python ÷ Go |", "|---|---:|---:|---:|---:|---:|"]
    for phase in PHASES:
        g, p = go[phase], py[phase]
        lines.append(f"| {phase} | {g['median_s'] * 1e3:.2f} ms | {g['p90_s'] * 1e3:.2f} ms | "
                     f"{p['median_s'] * 1e3:.2f} ms | {p['p90_s'] * 1e3:.2f} ms | "
                     f"{p['median_s'] / g['median_s']:.2f}× |")
    total = {v: sum(r[ph]["median_s"] for ph in PHASES) for v, r in (("go", go), ("python", py))}
    lines.append(f"| sum of medians | {total['go'] * 1e3:.1f} ms | | {total['python'] * 1e3:.1f} ms | | "
                 f"{total['python'] / total['go']:.2f}× |")
    lines += ["", "Inside this shim's Create and Start (`-debug` rounds, from its log):", "",
              "| inner phase | median | p90 |", "|---|---:|---:|"]
    inner = [name for name, _ in INNER] + sorted(k for k in dbg if k.startswith("runc "))
    lines += [f"| {k} | {dbg[k]['median_s'] * 1e3:.2f} ms | {dbg[k]['p90_s'] * 1e3:.2f} ms |"
              for k in inner if k in dbg]
    lines += [(f"| (debug rounds) create RPC | {dbg['create']['median_s'] * 1e3:.2f} ms | "
              f"{dbg['create']['p90_s'] * 1e3:.2f} ms |")]
    return lines

