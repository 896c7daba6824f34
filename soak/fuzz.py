"""A seeded fuzzer on a shim's ttrpc socket: many frames, some well-formed, most not.

Frames go out in batches, one connection per batch, each batch ending with a valid State
(the sentinel): its reply says the shim got through the batch, or the connection was closed
first. Kinds of frame: requests for real methods with random payloads, unknown services and
methods, requests whose bytes are not a ``ttrpc.Request``, valid requests with bytes flipped,
odd headers (response/data types, random flags, even stream ids); half the batches carry one
protocol violation (an unknown frame type, or a stream id going backwards) at a random place,
and some end with a header that promises more than follows (truncated, oversize). Never
sent: ``Create`` (a payload that happens to parse could mount or write at a random bundle
path), and a real task id to anything but State/Pids/Stats/Connect/Wait-free read calls.

Judged: the shim survives, answers State after, and its Rss stays bounded. Reported: the
status codes answered and how many connections the shim closed.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter

from integration.harness import Containerd, pid_alive
from shim.proto import shim_pb2, ttrpc_pb2
from shim.ttrpc.codec import HEADER_SIZE, MAX_PAYLOAD, FrameDecoder
from shim.ttrpc.errors import Code

from .common import SHIMS, Ids, address_of, ctr_or_raise, log, memory, mib, remove_tasks, run_args, serving_pid, wait_status
from .report import Section
from .wire import CLOSED_CODE, connect, read_responses, request, state

HEADER = struct.Struct(">IIBB")
BATCH = 250
READ_ONLY = ("State", "Pids", "Stats", "Connect")
METHODS = ("State", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill", "Exec", "ResizePty",
           "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown")
#: Rss may grow this much over the fuzz before it counts as unbounded
RSS_SLACK = 16 << 20


class Frames:
    """The frame generator: ``next(stream_id)`` -> (kind, bytes)."""

    def __init__(self, rng: random.Random, task: str, ns: str) -> None:
        self.rng, self.task, self.ns = rng, task, ns

    def junk(self, lo: int = 0, hi: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def next(self, sid: int) -> tuple[str, bytes]:
        r, k = self.rng, self.rng.random()
        if k < 0.35:
            return "method, random payload", request(sid, r.choice(METHODS), self.junk(), self.ns)
        if k < 0.45:
            method = r.choice(READ_ONLY)
            ident = self.task if r.random() < 0.5 else self.junk(1, 12).hex()
            return "read call, real or random id", request(sid, method, shim_pb2.StateRequest(id=ident).SerializeToString(), self.ns)
        if k < 0.55:
            svc = r.choice(("containerd.task.v2.Task", "containerd.task.v3.Task", self.junk(1, 20).hex(), ""))
            return "unknown service/method", request(sid, self.junk(0, 10).hex(), self.junk(), self.ns, service=svc)
        if k < 0.70:
            return "payload not a Request", _frame(sid, 1, 0, self.junk(1, 200))
        if k < 0.85:
            good = bytearray(request(sid, r.choice(METHODS), self.junk(), self.ns)[HEADER_SIZE:])
            for _ in range(r.randint(1, 4)):
                if good:
                    good[r.randrange(len(good))] = r.randrange(256)
            return "Request with flipped bytes", _frame(sid, 1, 0, bytes(good))
        sid2 = sid if r.random() < 0.5 else sid + 1  # an even id: the server's own numbering
        return "odd header (response/data type, flags, even id)", _frame(sid2, r.choice((1, 2, 3)), r.randrange(256),
                                                                         self.junk(0, 40))

    def violation(self, sid: int) -> tuple[str, bytes]:
        """A protocol violation: an unknown frame type, or a request id lower than the last one."""
        if self.rng.random() < 0.5:
            return "violation: unknown frame type", _frame(sid, self.rng.choice((0, 4, 7, 255)), 0, self.junk(0, 40))
        return "violation: stream id going backwards", request(max(1, sid - 4), "State", b"", self.ns)

    def tail(self, sid: int) -> tuple[str, bytes]:
        """A header that promises more than follows: sent last, the connection is closed after it."""
        if self.rng.random() < 0.5:
            return "truncated frame", HEADER.pack(1000, sid, 1, 0) + self.junk(0, 50)
        return "oversize length", HEADER.pack(self.rng.choice((MAX_PAYLOAD + 1, 0xFFFFFFFF)), sid, 1, 0) + self.junk(0, 50)


def _frame(sid: int, typ: int, flags: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), sid, typ, flags) + payload


def batch(path: str, gen: Frames, n: int, tally: Counter, codes: Counter) -> int:
    """One connection: ``n`` frames (half the batches with one protocol violation among them) and
    the sentinel; returns the frames sent."""
    sid, parts = 1, []
    bad_at = gen.rng.randrange(n) if gen.rng.random() < 0.5 else -1
    for k in range(n):
        kind, data = gen.violation(sid) if k == bad_at else gen.next(sid)
        tally[kind] += 1
        parts.append(data)
        sid += 2
    sentinel_sid = sid
    parts.append(request(sentinel_sid, "State", shim_pb2.StateRequest(id=gen.task).SerializeToString(), gen.ns))
    tail = gen.rng.random() < 0.1
    if tail:
        kind, data = gen.tail(sid + 2)
        tally[kind] += 1
        parts.append(data)
    which = "with a violation" if bad_at >= 0 else "clean"
    tally[f"batches {which}"] += 1
    try:
        with connect(path, timeout=10) as s:
            try:
                s.sendall(b"".join(parts))
            except OSError:
                tally[f"closed by the shim while sending ({which})"] += 1
                return n + 1 + tail
            got, closed = read_sentinel(s, sentinel_sid, codes)
            if closed and not got:
                tally[f"closed by the shim before the sentinel ({which})"] += 1
            elif not got:
                tally[f"sentinel not answered within 10 s ({which})"] += 1
    except OSError:
        tally["connect failed"] += 1
    return n + 1 + tail


def read_sentinel(s: socket.socket, sentinel: int, codes: Counter) -> tuple[bool, bool]:
    """Count every reply's status until the sentinel's arrives; (sentinel seen, closed)."""
    dec = FrameDecoder()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(1 << 16)
        except (TimeoutError, OSError):
            return False, False
        if not data:
            return False, True
        try:
            frames = dec.feed(data)
        except Exception:  # noqa: BLE001 - a shim sending garbage is counted, not fatal
            codes["(undecodable reply)"] += 1
            return False, True
        for f in frames:
            try:
                code = ttrpc_pb2.Response.FromString(f.payload).status.code
            except Exception:  # noqa: BLE001
                code = -3
            codes[_name(code)] += 1
            if f.stream_id == sentinel:
                return True, False
    return False, False


def _name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return str(code)


#: a valid State, then in the same write a protocol violation: (replies expected from a server that ignores it)
VIOLATIONS = {
    "an unknown frame type (7)": (lambda st, ns: request(1, "State", st, ns) + _frame(3, 7, 0, b""), 1),
    "a stream id going backwards": (lambda st, ns: request(5, "State", st, ns) + request(1, "State", st, ns), 2),
}


def violation_probe(path: str, task: str, ns: str) -> dict[str, dict]:
    """Is the valid request before a violation answered, and is the connection kept?"""
    out = {}
    st = shim_pb2.StateRequest(id=task).SerializeToString()
    for label, (build, want) in VIOLATIONS.items():
        with connect(path) as s:
            s.sendall(build(st, ns))
            codes, closed = read_responses(s, FrameDecoder(), want, 1.0)
        out[label] = {"replies": [_name(x) for x in codes], "closed": closed}
    return out


def fuzz_one(c: Containerd, name: str, frames: int, seed: int) -> dict:
    path, pid = address_of(c, name), serving_pid(c, name)
    gen = Frames(random.Random(seed), name, c.namespace)
    tally, codes = Counter(), Counter()
    rss = {"before": (memory(pid) or {}).get("rss")}
    peak = [rss["before"] or 0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            m = memory(pid)
            if m:
                peak[0] = max(peak[0], m["rss"])
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0, sent = time.monotonic(), 0
    try:
        while sent < frames and pid_alive(pid):
            sent += batch(path, gen, min(BATCH, frames - sent), tally, codes)
    finally:
        stop.set()
        watcher.join()
    code, t = state(path, name, c.namespace)
    probe = violation_probe(path, name, c.namespace)
    after = (memory(pid) or {}).get("rss")
    rss |= {"peak": max(peak[0], after or 0), "after": after}
    return {"frames": sent, "seconds": time.monotonic() - t0, "alive": pid_alive(pid), "state_after": code,
            "state_after_s": t, "violations": probe, "kinds": dict(tally), "codes": dict(codes.most_common()), "rss": rss}


def run(c: Containerd, ids: Ids, frames: int, seed: int) -> Section:
    sec = Section("fuzzer")
    names = {s.name: ids.new(s, "fuzz") for s in SHIMS}
    res = {}
    try:
        for s in SHIMS:
            ctr_or_raise(c, "run", "-d", *run_args(s), c.image_ref, names[s.name], "sleep", "100000")
        wait_status(c, list(names.values()), "RUNNING")
        for s in SHIMS:
            log(f"fuzz: {frames} frames at the {s.name} shim")
            res[s.name] = fuzz_one(c, names[s.name], frames, seed)
        tasks = c.tasks()
        for s in SHIMS:
            res[s.name]["task_after"] = (tasks.get(names[s.name]) or {}).get("status")
    finally:
        remove_tasks(c, list(names.values()))
    g, p = res["go"], res["python"]
    ok = [r["alive"] and r["state_after"] == 0 and r["task_after"] == "RUNNING" for r in (g, p)]
    sec.judged(f"{frames} fuzzed frames (seed {seed}): shim alive, State OK, task RUNNING after", ok[0], ok[1],
               *[f"{r['frames']} frames in {r['seconds']:.0f} s; " + ("alive" if r["alive"] else "DEAD")
                 + ("" if r["state_after"] == 0 else f", State → {r['state_after']}") for r in (g, p)])
    bounded = [r["rss"]["after"] is not None and r["rss"]["peak"] <= (r["rss"]["before"] or 0) + RSS_SLACK
               for r in (g, p)]
    sec.judged(f"… shim Rss before → peak → after (bounded: peak ≤ before + {RSS_SLACK >> 20} MiB)", *bounded,
               *[" → ".join(mib(r["rss"][k]) for k in ("before", "peak", "after")) for r in (g, p)])
    sec.text("… status codes answered", *[_codes(r["codes"]) for r in (g, p)])
    for which in ("clean", "with a violation"):
        sec.text(f"… batches {which}: closed by the shim / sentinel unanswered",
                 *[f"{_closed(r['kinds'], which)} / {r['kinds'].get(f'sentinel not answered within 10 s ({which})', 0)}"
                   f" of {r['kinds'].get(f'batches {which}', 0)}" for r in (g, p)])
    for label in VIOLATIONS:
        outcome = [_violation_text(r["violations"][label]) for r in (g, p)]
        differs = outcome[0] != outcome[1]
        sec.text(f"a valid State, then in the same write {label}", *outcome,
                 "**differs from Go** (see notes)" if differs else "same")
        if differs and not sec.notes:
            sec.notes.append("a request id lower than the last is a protocol violation to the Python shim "
                             "(shim/ttrpc/codec.py: answering it could give one stream two responses): the valid "
                             "requests before it are answered, then the connection closes; the Go shim (ttrpc 1.1) "
                             "does not check the order and answers every request. Frames of unknown type are "
                             "skipped by both")
    sec.details = res
    if CLOSED_CODE in (g["state_after"], p["state_after"]):
        sec.notes.append("State after the fuzz found the connection closed")
    return sec


def _violation_text(v: dict) -> str:
    replies = f"replies {', '.join(v['replies'])}" if v["replies"] else "no reply"
    return f"{replies}; connection {'closed' if v['closed'] else 'kept'}"


def _closed(kinds: dict, which: str) -> int:
    return sum(v for k, v in kinds.items() if k.startswith("closed by the shim") and k.endswith(f"({which})"))


def _codes(codes: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in codes.items()) or "none"
