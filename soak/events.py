"""Event sequences from a recorded ``ctr events`` stream, checked per task and per exec.

A ``Recording`` is the harness's ``EventStream`` (a live ``ctr events`` subscription, parsed as
lines arrive) plus an index by container id, built once per check rather than scanning tens of
thousands of events per task. The rules are containerd's contract with a shim, which CRI and
ctr rely on: a task publishes create, start, exit, delete exactly once each and in that order;
an exec publishes exec-added, exec-started and one exit carrying its exec id, in that order; the
exit carries the process's status.
"""

from __future__ import annotations

from collections import defaultdict

from integration.ctr_events import Event, EventStream
from integration.harness import Containerd, wait_for

TASK_SEQUENCE = ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete")
EXEC_SEQUENCE = ("/tasks/exec-added", "/tasks/exec-started", "/tasks/exit")


class Recording:
    def __init__(self, c: Containerd) -> None:
        self.stream = EventStream(c)

    def close(self) -> None:
        self.stream.close()

    def index(self) -> dict[tuple[str, str | None], list[Event]]:
        """/tasks/* events by (container id, exec id or None for the task itself), in arrival order."""
        out: dict[tuple[str, str | None], list[Event]] = defaultdict(list)
        for e in self.stream.snapshot():
            if e.topic.startswith("/tasks/"):
                name = e.body.get("container_id", "")
                process = e.body.get("exec_id") or (e.body.get("id") if e.topic == "/tasks/exit" else None)
                out[(name, None if process in (None, "", name) else process)].append(e)
        return out

    def wait_checked(self, expect: dict, timeout: float) -> dict[str, list[str]]:
        """Wait (bounded) until every expected sequence is complete; return the problems left.

        ``expect`` = {(container id, exec id or None): exit status}. A sequence still incomplete
        at ``timeout`` is reported as such, with what did arrive.
        """
        problems: dict[str, list[str]] = {}

        def done() -> bool:
            nonlocal problems
            problems = check_all(self.index(), expect)
            return not problems
        try:
            wait_for(done, timeout=timeout, interval=0.5, message="event sequences")
        except TimeoutError:
            pass
        return problems


def _status(e: Event) -> int:
    return int(e.body.get("exit_status", 0))  # ctr events omits a zero status


def check_task(events: list[Event], name: str, status: int) -> list[str]:
    """create/start/exit/delete once each, in order, exit and delete with ``status``."""
    own = [e for e in events if e.topic in TASK_SEQUENCE and (e.topic != "/tasks/exit" or e.body.get("id") == name)]
    topics = tuple(e.topic for e in own)
    problems = []
    if topics != TASK_SEQUENCE:
        problems.append(f"task events {list(topics)}")
    for e in own:
        if e.topic in ("/tasks/exit", "/tasks/delete") and _status(e) != status:
            problems.append(f"{e.topic} exit_status {_status(e)}, expected {status}")
    return problems


def check_exec(events: list[Event], exec_id: str, status: int) -> list[str]:
    """exec-added/exec-started/exit once each, in order, the exit with ``status``."""
    own = [e for e in events if e.topic in EXEC_SEQUENCE
           and (e.body.get("exec_id") == exec_id or (e.topic == "/tasks/exit" and e.body.get("id") == exec_id))]
    topics = tuple(e.topic for e in own)
    problems = []
    if topics != EXEC_SEQUENCE:
        problems.append(f"exec events {list(topics)}")
    for e in own:
        if e.topic == "/tasks/exit" and _status(e) != status:
            problems.append(f"exit_status {_status(e)}, expected {status}")
    return problems


def check_all(index: dict[tuple[str, str | None], list[Event]], expect: dict) -> dict[str, list[str]]:
    out = {}
    for (name, exec_id), status in expect.items():
        evs = index.get((name, exec_id), [])
        p = check_task(evs, name, status) if exec_id is None else check_exec(evs, exec_id, status)
        if p:
            out[name if exec_id is None else f"{name}/{exec_id}"] = p
    return out
