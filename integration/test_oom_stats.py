"""OOM events and task metrics, through containerd 1.6 + ctr.

They target our Python shim (runtime ``io.containerd.runc.v2-py``); to check
the tests themselves against the reference Go shim:

    SHIM_RUNTIME=io.containerd.runc.v2 .venv/bin/python -m pytest integration/test_oom_stats.py -q

On this cgroup v1 (hybrid) host ``ctr task metrics`` gets
``io.containerd.cgroups.v1.Metrics``; the table shows
memory.usage_in_bytes/limit_in_bytes/stat.cache, cpuacct.usage(_percpu) and
pids.current/limit, ``--format json`` the whole message (protobuf JSON names).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from integration.ctr_events import EventStream
from integration.harness import EVENTUALLY, GO_RUNTIME, PY_RUNTIME, PY_SHIM_BINARY, wait_for

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
IS_GO_SHIM = RUNTIME == GO_RUNTIME

OOM_LIMIT = 32 * 1024 * 1024
METRICS_LIMIT = 64 * 1024 * 1024
OOM_REPEATS = 5


@pytest.fixture(autouse=True)
def _shim_installed(containerd):
    if RUNTIME == PY_RUNTIME and shutil.which(PY_SHIM_BINARY, path=containerd.env["PATH"]) is None:
        pytest.fail(f"{PY_SHIM_BINARY} not found on containerd's PATH ({containerd.env['PATH']})")


@pytest.fixture
def events(containerd):
    stream = EventStream(containerd)
    try:
        yield stream
    finally:
        stream.close()


# -- helpers -----------------------------------------------------------------------

def task_status(containerd, cid) -> str | None:
    t = containerd.tasks().get(cid)
    return t["status"] if t else None


def wait_status(containerd, cid, status, timeout=EVENTUALLY):
    wait_for(lambda: task_status(containerd, cid) == status, timeout=timeout,
             message=lambda: f"task {cid} to be {status} (is {task_status(containerd, cid)})")


def metrics_table(containerd, cid) -> dict[str, str]:
    """``ctr task metrics ID`` (table): {metric: value}."""
    r = containerd.ctr("task", "metrics", cid, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "METRIC" in r.stdout, r.stdout
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["METRIC", "VALUE"])
    out = {}
    for line in lines[start + 1:]:
        name, _, value = line.strip().partition(" ")
        if name:
            out[name] = value.strip()
    return out


def metrics_json(containerd, cid) -> dict:
    r = containerd.ctr("task", "metrics", "--format", "json", cid, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- OOM -----------------------------------------------------------------------------

def test_oom_event_precedes_exit_every_time(containerd, image, new_cid, events):
    for attempt in range(OOM_REPEATS):
        cid = new_cid(f"oom{attempt}")
        r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--memory-limit", str(OOM_LIMIT),
                           image, cid, "sh", "-c", "tail /dev/zero", check=False, timeout=120)
        assert r.returncode == 137, (attempt, r.stdout, r.stderr)
        got = wait_for(
            lambda: (lambda ev: ev if any(e.topic == "/tasks/delete" for e in ev) else None)(events.tasks(cid)),
            timeout=EVENTUALLY, message=lambda: f"/tasks/delete of {cid}; have {[e.topic for e in events.tasks(cid)]}")
        topics = [e.topic for e in got]
        assert "/tasks/oom" in topics, (attempt, topics)
        exits = [i for i, t in enumerate(topics) if t == "/tasks/exit"]
        assert len(exits) == 1, (attempt, topics)
        assert topics.index("/tasks/oom") < exits[0], f"attempt {attempt}: /tasks/oom after /tasks/exit: {topics}"
        assert got[exits[0]].body["exit_status"] == 137, got[exits[0]].body
        assert cid not in containerd.containers()


# -- metrics ----------------------------------------------------------------------------

def test_metrics_of_running_task(containerd, image, cid):
    containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "300")
    wait_status(containerd, cid, "RUNNING")

    table = metrics_table(containerd, cid)
    assert int(table["memory.usage_in_bytes"]) > 0, table
    assert int(table["cpuacct.usage"]) > 0, table
    assert table["cpuacct.usage_percpu"].startswith("["), table
    assert int(table["pids.current"]) >= 1, table

    data = metrics_json(containerd, cid)
    # v1 Metrics (io.containerd.cgroups.v1.Metrics) in protobuf JSON names
    assert {"pids", "cpu", "memory", "blkio"} <= set(data), data
    assert data["pids"]["current"] >= 1
    assert data["cpu"]["usage"]["total"] > 0 and data["cpu"]["usage"]["per_cpu"]
    memory = data["memory"]
    assert memory["usage"]["usage"] > 0 and memory["usage"]["limit"] > 0
    assert {"usage", "swap", "kernel", "kernel_tcp"} <= set(memory), memory
    assert "hierarchical_memory_limit" in memory, memory


def test_metrics_show_memory_limit_and_survive_stop(containerd, image, cid):
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--memory-limit", str(METRICS_LIMIT),
                   image, cid, "sleep", "300")
    wait_status(containerd, cid, "RUNNING")
    table = metrics_table(containerd, cid)
    assert int(table["memory.limit_in_bytes"]) == METRICS_LIMIT, table
    data = metrics_json(containerd, cid)
    assert data["memory"]["usage"]["limit"] == METRICS_LIMIT
    assert data["memory"]["hierarchical_memory_limit"] == METRICS_LIMIT

    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    # Stopped but not deleted: the cgroup is still there (runc delete has not run),
    # and the Go shim keeps answering from it; so do we.
    table = metrics_table(containerd, cid)
    assert int(table["pids.current"]) == 0, table
    assert int(table["memory.limit_in_bytes"]) == METRICS_LIMIT, table
    data = metrics_json(containerd, cid)
    assert data["memory"]["usage"]["limit"] == METRICS_LIMIT
    assert not data["pids"].get("current"), data["pids"]

    containerd.ctr("task", "rm", cid)
    containerd.ctr("containers", "rm", cid)
