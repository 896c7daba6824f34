"""Task API beyond create/start/kill/delete, driven through containerd 1.6 + ctr:
exec, pause/resume, the event stream, kill --all, exec exits before the
init's, and shared pid namespaces.

They target our Python shim (runtime ``io.containerd.runc.v2-py``); to check
the tests themselves against the reference Go shim:

    SHIM_RUNTIME=io.containerd.runc.v2 .venv/bin/python -m pytest integration/test_task_api.py -q

Error texts differ between the shims (the Go shim wraps most errors as
``unknown``; ours keeps containerd's codes), so only the shared part of a
message is asserted, plus the code where ours is known.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from integration.ctr_events import EventStream
from integration.harness import (
    EVENTUALLY,
    GO_RUNTIME,
    PY_RUNTIME,
    PY_SHIM_BINARY,
    oci_runtime_binary,
    pid_alive,
    read_cmdline,
    wait_cmdline,
    wait_for,
)

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
IS_GO_SHIM = RUNTIME == GO_RUNTIME
EXIT_CODE_RE = re.compile(r"exit with non-zero exit code (\d+)")
#: what each OCI runtime says when an exec's executable does not exist
MISSING_EXEC_ERROR = {
    "runc": 'exec: "/no/such/binary": stat /no/such/binary: no such file or directory',
    "crun": "executable file `/no/such/binary` not found in $PATH: No such file or directory",
}


@pytest.fixture(autouse=True)
def _shim_installed(containerd):
    if RUNTIME == PY_RUNTIME and shutil.which(PY_SHIM_BINARY, path=containerd.env["PATH"]) is None:
        pytest.fail(f"{PY_SHIM_BINARY} not found on containerd's PATH ({containerd.env['PATH']})")


# -- helpers -----------------------------------------------------------------

def run_detached(containerd, image, cid, *cmd, extra=(), status="RUNNING"):
    """``ctr run -d``; waits for ``status``, returns the init's pid."""
    r = containerd.ctr("run", "-d", "--runtime", RUNTIME, *extra, image, cid, *cmd, check=False)
    assert r.returncode == 0, r.stderr
    wait_status(containerd, cid, status)
    return int(containerd.tasks()[cid]["pid"])


def task_status(containerd, cid) -> str | None:
    t = containerd.tasks().get(cid)
    return t["status"] if t else None


def wait_status(containerd, cid, status, timeout=EVENTUALLY):
    wait_for(lambda: task_status(containerd, cid) == status, timeout=timeout,
             message=lambda: f"task {cid} to be {status} (is {task_status(containerd, cid)})")


def task_ps(containerd, cid) -> dict[int, str]:
    """``ctr task ps``: {pid: INFO column}."""
    lines = containerd.ctr("task", "ps", cid).stdout.splitlines()
    assert lines and lines[0].split() == ["PID", "INFO"], lines
    out = {}
    for line in lines[1:]:
        pid, _, info = line.strip().partition(" ")
        out[int(pid)] = info.strip()
    return out


def exec_(containerd, cid, exec_id, *cmd, input=None, timeout=60):
    return containerd.ctr("task", "exec", "--exec-id", exec_id, cid, *cmd,
                          check=False, input=input, timeout=timeout)


def remove_task(containerd, cid) -> int:
    """``ctr task rm`` of a stopped task; the exit status it reports (ctr logs only non-zero)."""
    r = containerd.ctr("task", "rm", cid)
    m = EXIT_CODE_RE.search(r.stderr)
    return int(m.group(1)) if m else 0


def freezer_state(pid: int) -> str:
    """freezer.state of the v1 freezer cgroup ``pid`` is in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return (Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state").read_text().strip()
    pytest.skip("no cgroup v1 freezer hierarchy")


class Popened:
    """A background ctr process, killed (by its pid) and reaped on exit."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def events(containerd):
    log = EventStream(containerd)
    try:
        yield log
    finally:
        log.close()


# -- exec ----------------------------------------------------------------------

def test_exec_output_stderr_and_exit_code(containerd, image, cid):
    run_detached(containerd, image, cid, "sleep", "100")
    r = exec_(containerd, cid, "e-out", "sh", "-c", "echo hi; echo err >&2; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, "hi\n", "err\n")
    # the exec id is free again once ctr deleted the exec
    r = exec_(containerd, cid, "e-out", "sh", "-c", "echo again")
    assert (r.returncode, r.stdout, r.stderr) == (0, "again\n", "")
    assert task_status(containerd, cid) == "RUNNING"


def test_exec_of_missing_binary_reports_runc_error(containerd, image, cid):
    run_detached(containerd, image, cid, "sleep", "100")
    r = exec_(containerd, cid, "e-missing", "/no/such/binary")
    assert r.returncode != 0
    # the OCI runtime's own words (runc's or crun's), passed through by the shim
    assert MISSING_EXEC_ERROR[oci_runtime_binary()] in r.stderr, r.stderr
    assert "OCI runtime exec failed" in r.stderr, r.stderr
    assert task_status(containerd, cid) == "RUNNING"
    assert len(task_ps(containerd, cid)) == 1


def test_duplicate_exec_id_while_running(containerd, image, cid):
    init = run_detached(containerd, image, cid, "sleep", "100")
    with Popened(containerd.ctr_popen("task", "exec", "--exec-id", "dup", cid, "sleep", "101")) as first:
        wait_for(lambda: len(task_ps(containerd, cid)) == 2, message="the first exec to run")
        r = exec_(containerd, cid, "dup", "true")
        assert r.returncode != 0
        assert "already exists" in r.stderr, r.stderr
        assert first.poll() is None, "the duplicate disturbed the running exec"
        ps = task_ps(containerd, cid)
        assert len(ps) == 2 and init in ps


def test_exec_into_stopped_task_fails(containerd, image, cid):
    run_detached(containerd, image, cid, "sh", "-c", "exit 0", status="STOPPED")
    r = exec_(containerd, cid, "late", "true")
    assert r.returncode != 0
    assert "cannot exec in a stopped" in r.stderr, r.stderr
    if not IS_GO_SHIM:  # the Go shim says "...: unknown"
        assert "failed precondition" in r.stderr, r.stderr
    assert remove_task(containerd, cid) == 0


def test_ps_shows_exec_id_of_exec(containerd, image, cid):
    init = run_detached(containerd, image, cid, "sleep", "100")
    with Popened(containerd.ctr_popen("task", "exec", "--exec-id", "ps-exec", cid, "sleep", "101")):
        ps = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(task_ps(containerd, cid)),
                      message="two processes in ctr task ps")
        assert ps[init] == "-"
        (exec_pid,) = set(ps) - {init}
        # ps lists the exec as soon as it is in the cgroup, maybe still inside execve
        assert wait_cmdline(exec_pid, ["sleep", "101"]) == ["sleep", "101"]
        # ctr prints the ProcessDetails the shim put into the info Any
        assert "ProcessDetails" in ps[exec_pid] and "ExecID:ps-exec," in ps[exec_pid], ps[exec_pid]


def test_exec_stdin_reaches_process_before_close_io(containerd, image, cid):
    run_detached(containerd, image, cid, "sleep", "100")
    # ctr copies stdin into the fifo, and calls CloseIO as soon as its own stdin
    # hits EOF -- typically while the shim's Start (runc exec) is still running.
    # CloseIO must not cut off what was already written (it did up to 02f3358).
    r = exec_(containerd, cid, "e-cat", "cat", input="data\n", timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "data\n", "")


# -- pause / resume ----------------------------------------------------------

def test_pause_freezes_and_resume_thaws(containerd, image, cid):
    init = run_detached(containerd, image, cid, "sh", "-c", "sleep 100 & wait")
    pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(task_ps(containerd, cid)),
                    message="init and its child")
    assert freezer_state(init) == "THAWED"

    containerd.ctr("task", "pause", cid)
    assert task_status(containerd, cid) == "PAUSED"
    assert {p: freezer_state(p) for p in pids} == dict.fromkeys(pids, "FROZEN")

    r = containerd.ctr("task", "pause", cid, check=False)
    assert r.returncode != 0 and "cannot pause a paused" in r.stderr, r.stderr
    assert task_status(containerd, cid) == "PAUSED"
    assert freezer_state(init) == "FROZEN"

    containerd.ctr("task", "resume", cid)
    assert task_status(containerd, cid) == "RUNNING"
    assert {p: freezer_state(p) for p in pids} == dict.fromkeys(pids, "THAWED")
    r = containerd.ctr("task", "resume", cid, check=False)
    assert r.returncode != 0 and "cannot resume a running" in r.stderr, r.stderr
    assert all(pid_alive(p) for p in pids)


# -- events ----------------------------------------------------------------------

def test_event_order_with_exec_pause_resume(containerd, image, cid, events):
    init = run_detached(containerd, image, cid, "sleep", "100")
    r = exec_(containerd, cid, "ev-exec", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stderr
    containerd.ctr("task", "pause", cid)
    containerd.ctr("task", "resume", cid)
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    assert remove_task(containerd, cid) == 137
    got = events.wait_tasks(cid, lambda ev: ev and ev[-1].topic == "/tasks/delete", message="/tasks/delete")
    assert [e.topic for e in got] == [
        "/tasks/create", "/tasks/start",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/paused", "/tasks/resumed",
        "/tasks/exit", "/tasks/delete",
    ]
    create, start, added, started, exec_exit, _, _, init_exit, delete = (e.body for e in got)
    assert create["pid"] == start["pid"] == init
    assert added["exec_id"] == started["exec_id"] == "ev-exec"
    assert exec_exit["id"] == "ev-exec" and exec_exit["pid"] == started["pid"] != init
    assert exec_exit["exit_status"] == 3
    assert init_exit["id"] == cid and init_exit["pid"] == init and init_exit["exit_status"] == 137
    assert delete["pid"] == init and delete["exit_status"] == 137
    assert all(e.namespace == containerd.namespace for e in got)


def test_exec_exit_precedes_init_exit(containerd, image, cid, events):
    init = run_detached(containerd, image, cid, "sleep", "100")
    with Popened(containerd.ctr_popen("task", "exec", "--exec-id", "long", cid, "sleep", "101")) as ex:
        wait_for(lambda: len(task_ps(containerd, cid)) == 2, message="the exec to run")
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid)  # the init only: the kernel takes the exec
        got = events.wait_tasks(cid, lambda ev: sum(e.topic == "/tasks/exit" for e in ev) == 2,
                                message="two /tasks/exit")
        assert ex.wait(timeout=EVENTUALLY) == 137
    exits = [e.body for e in got if e.topic == "/tasks/exit"]
    assert [(x["id"], x["exit_status"]) for x in exits] == [("long", 137), (cid, 137)]
    assert exits[1]["pid"] == init
    wait_status(containerd, cid, "STOPPED")
    assert remove_task(containerd, cid) == 137


# -- kill --all -------------------------------------------------------------------

@pytest.mark.parametrize("sig,status", [("SIGKILL", 137), ("SIGTERM", 0)])
def test_kill_all_reaches_every_process(containerd, image, cid, sig, status):
    # SIGTERM: the pid-namespace init (sh, no handler) ignores it, so the task
    # only stops if the signal reached the children (then `wait` returns, sh exits 0)
    init = run_detached(containerd, image, cid, "sh", "-c", "sleep 100 & sleep 101 & wait")
    pids = wait_for(lambda: (lambda p: p if len(p) == 3 else None)(task_ps(containerd, cid)),
                    message="init and two children")
    children = set(pids) - {init}
    # forked by sh, listed by ps maybe before their execve: "sh -c ..." or empty until then
    expected = [["sleep", "100"], ["sleep", "101"]]
    wait_for(lambda: sorted(read_cmdline(p) or [] for p in children) == expected,
             message=lambda: f"children {sorted(children)} to run {expected}: "
                             f"{ {p: read_cmdline(p) for p in children} }")
    assert sorted(read_cmdline(p) for p in children) == expected
    containerd.ctr("task", "kill", "-a", "-s", sig, cid)
    wait_status(containerd, cid, "STOPPED")
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=EVENTUALLY,
             message=lambda: f"all of {sorted(pids)} to die")
    assert remove_task(containerd, cid) == status


# -- shared pid namespace ---------------------------------------------------------

def test_shared_pid_namespace_leftovers_killed_on_init_exit(containerd, image, new_cid):
    sandbox, cid = new_cid("sandbox"), new_cid("member")
    sandbox_pid = run_detached(containerd, image, sandbox, "sleep", "100")
    init = run_detached(containerd, image, cid, "sh", "-c", "sleep 102 & wait",
                        extra=("--with-ns", f"pid:/proc/{sandbox_pid}/ns/pid"))
    assert os.readlink(f"/proc/{init}/ns/pid") == os.readlink(f"/proc/{sandbox_pid}/ns/pid")
    pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(task_ps(containerd, cid)),
                    message="init and its child")
    (child,) = set(pids) - {init}
    assert wait_cmdline(child, ["sleep", "102"]) == ["sleep", "102"]

    # not the namespace's init: SIGKILL takes only the sh, the kernel leaves its child
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    wait_for(lambda: not pid_alive(child), timeout=EVENTUALLY, message=f"leftover {child} to be killed by the shim")
    assert remove_task(containerd, cid) == 137
    assert task_status(containerd, sandbox) == "RUNNING" and pid_alive(sandbox_pid)
