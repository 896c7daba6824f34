"""Checkpoint and restore (criu), through containerd 1.6 + ctr and over ttrpc directly.

``criu check`` fails on kernels whose vDSO criu 3.17 cannot parse ("Failed to
fill self vdso symtable"); then every dump/restore fails in criu's kernel
feature detection, before it touches the container. The end-to-end test only
runs where ``criu check`` passes; the others check the failure path for
real: the error carries criu's own log, the task keeps running, and the
options containerd sends (CheckpointOptions, Create.checkpoint) reach runc.

ctr 1.6 restores with ``ctr containers checkpoint --task`` + ``ctr containers
restore --live`` (``ctr run`` has no ``--checkpoint``). The ctr tests can be
pointed at the Go shim with ``SHIM_RUNTIME=io.containerd.runc.v2``.

Under ``SHIM_RUNC_BINARY=crun`` the ctr tests need a crun built with CRIU
(``+CRIU``); Debian's crun 1.8 is not ("unknown command checkpoint"), which
test_crun.py checks. The ttrpc tests below run the session's OCI runtime too
(integration/shim_driver.py sends BinaryName; ``RuncSpy`` wraps that binary),
and those that need its checkpoint/restore commands carry the same skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2

from integration.harness import (
    EVENTUALLY,
    GO_RUNTIME,
    PY_RUNTIME,
    PY_SHIM_BINARY,
    crun_has_criu,
    oci_runtime_binary,
    pid_alive,
    wait_for,
)
from integration.shim_driver import expect_error

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
IS_GO_SHIM = RUNTIME == GO_RUNTIME
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"


def _criu_check() -> tuple[bool, str]:
    criu = shutil.which("criu")
    if criu is None:
        return False, "criu is not installed"
    try:
        r = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"criu check: {e}"
    if r.returncode == 0:
        return True, ""
    errors = [line for line in (r.stderr + r.stdout).splitlines() if "Error" in line]
    return False, "criu check fails on this kernel: " + ("; ".join(errors[-2:]) or f"exit {r.returncode}")


CRIU_OK, CRIU_REASON = _criu_check()
needs_criu = pytest.mark.skipif(not CRIU_OK, reason=CRIU_REASON)
needs_broken_criu = pytest.mark.skipif(CRIU_OK or shutil.which("criu") is None,
                                       reason="needs criu installed but failing (criu check passes here)")
OCI_RUNTIME = oci_runtime_binary()
needs_runtime_checkpoint = pytest.mark.skipif(
    OCI_RUNTIME == "crun" and not crun_has_criu(),
    reason="SHIM_RUNC_BINARY=crun: this crun is built without CRIU (no +CRIU in crun --version), "
           "so it has no checkpoint command; test_crun.py checks that error")


@pytest.fixture
def shim_installed(containerd):
    if RUNTIME == PY_RUNTIME and shutil.which(PY_SHIM_BINARY, path=containerd.env["PATH"]) is None:
        pytest.fail(f"{PY_SHIM_BINARY} not found on containerd's PATH ({containerd.env['PATH']})")


def task_status(containerd, cid) -> str | None:
    t = containerd.tasks().get(cid)
    return t["status"] if t else None


def wait_status(containerd, cid, status, timeout=EVENTUALLY):
    wait_for(lambda: task_status(containerd, cid) == status, timeout=timeout,
             message=lambda: f"task {cid} to be {status} (is {task_status(containerd, cid)})")


# -- through containerd + ctr ------------------------------------------------------------

@needs_criu
@needs_runtime_checkpoint
def test_checkpoint_and_live_restore(containerd, image, cid, shim_installed):
    ref = f"localhost/shimtest-checkpoint/{cid}:latest"
    counter = "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.1; done"
    containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sh", "-c", counter)
    wait_status(containerd, cid, "RUNNING")

    def count(exec_id: str) -> int:
        r = containerd.ctr("task", "exec", "--exec-id", exec_id, cid, "cat", "/count", check=False)
        return int(r.stdout) if r.returncode == 0 and r.stdout.strip().isdigit() else 0

    wait_for(lambda: count("c0") >= 3, message="the counter to run")
    try:
        containerd.ctr("containers", "checkpoint", "--task", "--rw", cid, ref, timeout=120)
        assert task_status(containerd, cid) == "RUNNING"  # the default leaves it running
        before = count("c1")
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_status(containerd, cid, "STOPPED")
        containerd.ctr("task", "rm", cid)
        containerd.ctr("containers", "rm", cid)

        containerd.ctr("containers", "restore", "--live", "--rw", cid, ref, timeout=120)
        wait_status(containerd, cid, "RUNNING")
        # a fresh sh would count from 1 again: the restored one goes on from memory
        after = wait_for(lambda: (lambda n: n if n > before else 0)(count("c2")), timeout=EVENTUALLY,
                         message=f"the restored counter to pass {before}")
        assert after > before
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_status(containerd, cid, "STOPPED")
        containerd.ctr("task", "rm", cid)
        containerd.ctr("containers", "rm", cid)
    finally:
        containerd.ctr("images", "rm", ref, check=False)


@needs_broken_criu
@needs_runtime_checkpoint
def test_failed_checkpoint_reports_criu_log_and_keeps_task_running(containerd, image, cid, shim_installed):
    containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "300")
    wait_status(containerd, cid, "RUNNING")
    pid = int(containerd.tasks()[cid]["pid"])
    bundle = containerd.bundle_dir / cid

    r = containerd.ctr("task", "checkpoint", cid, check=False, timeout=120)
    assert r.returncode != 0, r.stdout
    err = r.stderr
    assert "criu failed" in err, err  # runc's own words (crun with CRIU: untested here)
    assert f"{bundle}/criu-dump.log" in err, err
    if not IS_GO_SHIM:  # the Go shim names the file only; ours adds criu's log tail
        assert "Error (criu" in err and "vdso" in err, err
    dump_log = bundle / "criu-dump.log"
    assert dump_log.is_file(), sorted(os.listdir(bundle))
    assert "Error (criu" in dump_log.read_text(errors="replace")
    assert not (bundle / "criu-work").exists()

    assert task_status(containerd, cid) == "RUNNING"
    assert int(containerd.tasks()[cid]["pid"]) == pid and pid_alive(pid)
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    r = containerd.ctr("task", "rm", cid)
    assert "exit code 137" in r.stderr, r.stderr
    containerd.ctr("containers", "rm", cid)
    assert cid not in containerd.containers()
    wait_for(lambda: not pid_alive(pid), timeout=EVENTUALLY, message=f"init {pid} to be gone")


# -- over ttrpc, the test playing containerd ------------------------------------------------

def _driver():
    """integration.shim_driver and friends, imported only where they can work (root, runc, busybox)."""
    if os.geteuid() != 0:
        pytest.skip("protocol tests need root (they run real runc containers)")
    if shutil.which("runc") is None or not os.path.isfile("/usr/bin/busybox"):
        pytest.skip("runc or /usr/bin/busybox (busybox-static) not installed")
    from integration import shim_driver
    return shim_driver


class RuncSpy:
    """A ``BinaryName`` that records each invocation's argv, then execs the session's
    OCI runtime (runc, or crun under ``SHIM_RUNC_BINARY=crun``: both take the flags checked here)."""

    def __init__(self, tmp: Path) -> None:
        from integration.shim_driver import oci_runtime

        self.dir = tmp / "runc-argv"
        self.dir.mkdir()
        self.path = tmp / "runc-spy"
        self.runtime = oci_runtime()
        runc = shutil.which(self.runtime)
        assert runc is not None, f"{self.runtime} not found"
        self.path.write_text(
            "#!/bin/sh\n"
            f'for a in "$@"; do printf "%s\\n" "$a"; done > "{self.dir}/$$"\n'
            f'exec {runc} "$@"\n')
        self.path.chmod(0o755)

    def options(self) -> any_pb2.Any:
        from shim.proto import runc_options_pb2
        opts = runc_options_pb2.Options(binary_name=str(self.path))
        return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE, value=opts.SerializeToString())

    def calls(self) -> list[list[str]]:
        """argv of each invocation (after runc's global flags), oldest first."""
        files = sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [p.read_text().splitlines() for p in files]

    def commands(self) -> list[str]:
        return [_command(argv) for argv in self.calls()]

    def call(self, command: str) -> list[str]:
        found = [argv for argv in self.calls() if _command(argv) == command]
        assert len(found) == 1, f"runc {command}: {len(found)} calls; all: {self.calls()}"
        return found[0]


def _command(argv: list[str]) -> str:
    """The runc subcommand: the first argument after the global flags."""
    with_value = {"--root", "--log", "--log-format", "--criu"}
    i = 0
    while i < len(argv):
        if argv[i] in with_value:
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return argv[i]
    return ""


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _checkpoint_request(cid: str, path: Path, options=None):
    from shim.proto import runc_options_pb2, shim_pb2
    req = shim_pb2.CheckpointTaskRequest(id=cid, path=str(path))
    if options is not None:
        req.options.CopyFrom(any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE,
                                         value=runc_options_pb2.CheckpointOptions(**options).SerializeToString()))
    return req


@needs_broken_criu
@needs_runtime_checkpoint
async def test_checkpoint_options_reach_runc_and_criu(lab) -> None:
    from shim.proto import task_types_pb2
    from shim.ttrpc import Code

    await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    cid = lab.new_id("ckopt")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle, options=spy.options())
    await shim.start(cid)

    image = lab.tmp / "image"
    work = lab.tmp / "work"
    options = dict(exit=True, open_tcp=True, external_unix_sockets=True, terminal=True, file_locks=True,
                   empty_namespaces=["network"], work_path=str(work))
    message = (await expect_error(Code.UNKNOWN, shim.call("Checkpoint", _checkpoint_request(cid, image, options)))).message

    argv = spy.call("checkpoint")
    assert _flag(argv, "--image-path") == str(image), argv
    assert _flag(argv, "--work-path") == str(work), argv
    for flag in ("--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks"):
        assert flag in argv, (flag, argv)
    assert _flag(argv, "--empty-ns") == "network", argv
    assert "--leave-running" not in argv, argv  # exit=True
    assert argv[-1] == cid
    # runc's words name criu's log in the requested work path; criu wrote it there
    assert f"log file: {work}/dump.log" in message, message
    assert "Error (criu" in message and "vdso" in message, message  # criu's log tail
    assert f"{bundle}/criu-dump.log" in message, message
    assert "Error (criu" in (work / "dump.log").read_text(errors="replace")
    assert (bundle / "criu-dump.log").read_text() == (work / "dump.log").read_text()
    runc_log = [json.loads(line) for line in (bundle / "log.json").read_text().splitlines() if line.strip()]
    assert any(f"{work}/dump.log" in entry.get("msg", "") for entry in runc_log), runc_log

    # the task was not touched: still running, same pid
    state = await shim.state(cid)
    assert state.status == task_types_pb2.RUNNING and state.pid == created.pid and pid_alive(created.pid)

    # no options: --leave-running, work files under the bundle, removed afterwards
    message = (await expect_error(Code.UNKNOWN, shim.call("Checkpoint", _checkpoint_request(cid, image)))).message
    argv = spy.calls()[-1]
    assert _command(argv) == "checkpoint", spy.commands()
    assert "--leave-running" in argv, argv
    default_work = bundle / "criu-work"
    assert _flag(argv, "--work-path") == str(default_work), argv
    assert not {"--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks", "--empty-ns"} & set(argv)
    assert f"log file: {default_work}/dump.log" in message, message
    assert not default_work.exists(), "the shim's own criu work dir was left behind"
    assert (await shim.state(cid)).status == task_types_pb2.RUNNING

    await shim.kill(cid)
    assert (await shim.wait(cid)).exit_status == 137
    await shim.delete(cid)
    await shim.shutdown(cid)


@needs_broken_criu
@needs_runtime_checkpoint
async def test_create_from_checkpoint_restores_at_start(lab) -> None:
    from shim.proto import task_types_pb2
    from shim.ttrpc import Code

    drv = _driver()
    sink = await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    cid = lab.new_id("restore")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    checkpoint = lab.tmp / "checkpoint"
    checkpoint.mkdir()
    # what runc reads before asking criu (the dumped process's stdio); criu then fails
    (checkpoint / "descriptors.json").write_text(json.dumps(["/dev/null"] * 3))
    shim = await lab.start_shim(cid, bundle)

    created = await shim.create(cid, bundle, options=spy.options(), checkpoint=str(checkpoint))
    assert created.pid == 0
    assert spy.calls() == [], "Create from a checkpoint ran runc"
    assert not (bundle / "init.pid").exists()
    state = await shim.state(cid)
    assert state.status == task_types_pb2.CREATED and state.pid == 0
    events = await sink.wait_count(1)
    assert events[0].topic == "/tasks/create"
    assert events[0].event.checkpoint == str(checkpoint) and events[0].event.pid == 0

    message = (await expect_error(Code.UNKNOWN, shim.start(cid))).message
    assert "OCI runtime restore failed" in message, message
    assert "criu failed" in message, message  # runc's words
    assert "restore.log" in message and "Error (criu" in message, message  # criu's log tail
    argv = spy.call("restore")
    assert _flag(argv, "--image-path") == str(checkpoint), argv
    assert _flag(argv, "--bundle") == str(bundle), argv
    assert argv[-1] == cid

    # the shim keeps serving; the task never ran
    assert (await shim.connect(cid)).shim_pid == shim.pid
    state = await shim.state(cid)
    assert state.status == task_types_pb2.CREATED and state.pid == 0
    deleted = await shim.delete(cid)
    assert deleted.pid == 0
    await expect_error(Code.NOT_FOUND, shim.state(cid))
    r = subprocess.run([lab.runtime, "--root", drv.RUNC_ROOT, "state", cid], capture_output=True)
    assert r.returncode != 0, r.stdout
    await shim.shutdown(cid)
    await wait_for_async(lambda: not pid_alive(shim.pid), f"shim {shim.pid} to exit")
    topics = sink.topics()
    assert topics[0] == "/tasks/create" and topics[-1] == "/tasks/delete", topics
    assert "/tasks/start" not in topics and "/tasks/exit" not in topics, topics


async def test_delete_of_unrestored_checkpoint_task_is_prompt(lab) -> None:
    """A task created from a checkpoint has no process until Start restores it: Delete must not
    wait CREATED_DELETE_WAIT for that process's exit (trio never ends such a wait early, so a
    Delete that waited took at least that long; one that did not is one runtime delete)."""
    from shim.daemon.container import CREATED_DELETE_WAIT

    await lab.start_sink()
    cid = lab.new_id("unrestored")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    checkpoint = lab.tmp / "checkpoint"
    checkpoint.mkdir()
    shim = await lab.start_shim(cid, bundle)
    assert (await shim.create(cid, bundle, checkpoint=str(checkpoint))).pid == 0
    started = time.monotonic()
    await shim.delete(cid)
    took = time.monotonic() - started
    await shim.shutdown(cid)
    assert took < CREATED_DELETE_WAIT, f"Delete of a task with no process took {took:.1f}s"


async def test_checkpoint_of_created_task_is_failed_precondition(lab) -> None:
    from shim.proto import task_types_pb2
    from shim.ttrpc import Code

    await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    cid = lab.new_id("ckcreated")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle, options=spy.options())
    await expect_error(Code.FAILED_PRECONDITION, shim.call("Checkpoint", _checkpoint_request(cid, lab.tmp / "image")),
                       contains="created")
    assert "checkpoint" not in spy.commands(), spy.commands()
    state = await shim.state(cid)
    assert state.status == task_types_pb2.CREATED and state.pid == created.pid
    await shim.delete(cid)
    await shim.shutdown(cid)


async def wait_for_async(predicate, message: str, timeout: float = EVENTUALLY) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        await trio.sleep(0.05)
