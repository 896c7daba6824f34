"""``ctr events`` in the background, parsed as lines arrive (used by several test modules)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from integration.harness import EVENTUALLY, Containerd, wait_for

# "2026-11-25 10:58:52.129651712 +0000 UTC shimtest /tasks/oom {...}"
EVENT_LINE_RE = re.compile(r"^\S+ \S+ \S+ \S+ (?P<ns>\S+) (?P<topic>/\S+) ?(?P<body>.*)$")


@dataclass
class Event:
    namespace: str
    topic: str
    body: dict
    at: float = field(default_factory=time.monotonic)  # when the line was read (time.monotonic)


class EventStream:
    """``ctr events`` (a Popen, ended by its pid) with its lines parsed as they arrive."""

    def __init__(self, containerd: Containerd) -> None:
        self.containerd = containerd
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self.proc = containerd.ctr_popen("events", text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._ready()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            m = EVENT_LINE_RE.match(line.rstrip("\n"))
            if not m:
                continue
            try:
                body = json.loads(m["body"]) if m["body"] else {}
            except ValueError:
                body = {"raw": m["body"]}
            with self._lock:
                self.events.append(Event(m["ns"], m["topic"], body))

    def _ready(self) -> None:
        """Wait until the subscription is live: a namespace label we set shows up.

        An event published before ``ctr events`` has subscribed is never
        delivered, so the label is set again (new value) every half second.
        """
        ns = self.containerd.namespace
        tokens: set[str] = set()
        last = [0.0]

        def seen() -> bool:
            if any(e.topic == "/namespaces/update" and e.body.get("labels", {}).get("shimtest-probe") in tokens
                   for e in self.snapshot()):
                return True
            if time.monotonic() - last[0] >= 0.5:
                token = f"p{os.getpid()}-{time.monotonic_ns()}"
                tokens.add(token)
                self.containerd.ctr("namespaces", "label", ns, f"shimtest-probe={token}")
                last[0] = time.monotonic()
            return False

        try:
            wait_for(seen, timeout=EVENTUALLY, message=lambda: f"ctr events to see our probe ({self.proc.poll()=})")
        finally:
            self.containerd.ctr("namespaces", "label", ns, "shimtest-probe=", check=False)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def tasks(self, cid: str) -> list[Event]:
        """/tasks/* events of one container, in arrival order."""
        return [e for e in self.snapshot() if e.topic.startswith("/tasks/") and e.body.get("container_id") == cid]

    def wait_tasks(self, cid: str, predicate: Callable[[list[Event]], bool], timeout: float = EVENTUALLY,
                   message: str = "events") -> list[Event]:
        return wait_for(lambda: (lambda ev: ev if predicate(ev) else None)(self.tasks(cid)), timeout=timeout,
                        message=lambda: f"{message}; have {[e.topic for e in self.tasks(cid)]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
        self.proc.communicate(timeout=10)
        self._reader.join(timeout=5)
