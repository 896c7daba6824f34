"""Protocol-level tests: the test plays containerd 1.6 and drives our shim directly.

No containerd here: each test runs the shim binary's ``start`` action the way
containerd does (flags, cwd = bundle, TTRPC_ADDRESS, the runtime options on
stdin), talks ``containerd.task.v2.Task`` over ttrpc to the printed address,
and serves ``containerd.services.events.ttrpc.v1.Events/Forward`` itself to
record events. Containers are real (runc, or crun under
``SHIM_RUNC_BINARY=crun``, + a busybox rootfs in a plain directory).

No test asserts that something did *not* happen after merely sleeping: an
event that must not come is checked once the shim has exited (it drains its
event queue, each Forward answered by our sink after recording, before it
exits), and a call that must not return yet is checked once later calls on
the same connection were answered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

if os.geteuid() != 0:
    pytest.skip("protocol tests need root (they run real runc containers)", allow_module_level=True)
if shutil.which("runc") is None:
    pytest.skip("runc not installed", allow_module_level=True)
if not os.path.isfile("/usr/bin/busybox"):
    pytest.skip("/usr/bin/busybox (busybox-static) not installed", allow_module_level=True)

from integration.harness import EVENTUALLY, mounts_under, pid_alive
from integration.shim_driver import (
    NAMESPACE,
    NAMESPACE_HEADER,
    RUNC_ROOT,
    EventSink,
    Lab,
    Recorded,
    Shim,
    expect_error,
    listening_pids,
    socket_path_for,
    thp_disabled,
    wait_until,
)
from shim.proto import mount_pb2, shim_pb2, task_types_pb2
from shim.ttrpc import Code, TTRPCError

# -- fixtures --------------------------------------------------------------------------




def read_init_pid(bundle: Path) -> int:
    return int((bundle / "init.pid").read_text().strip())


async def shim_exits(shim, timeout: float = EVENTUALLY) -> None:
    await wait_until(lambda: not pid_alive(shim.pid), timeout, message=f"shim {shim.pid} to exit")


#: what each OCI runtime says about a config.json that is not JSON
BAD_CONFIG_ERROR = {
    "runc": "invalid character 't' looking for beginning of object key string",
    "crun": "error loading config.json",
}
#: the file each OCI runtime keeps in <root>/<id>: proof of which one ran the container
RUNTIME_STATE_FILE = {"runc": "state.json", "crun": "status"}


async def all_events(sink: EventSink, shim: Shim) -> list[Recorded]:
    """Every event the shim will ever send: call once it has exited.

    The shim sends its events one at a time and waits for each Forward's
    answer, which our sink gives after recording it; before exiting it drains
    its queue. So once it has exited, an event it did not send is an event it
    never will, unless the drain gave up (it logs that).
    """
    assert not pid_alive(shim.pid), "the shim is still running: more events may come"
    assert "never received" not in shim.log(), shim.log()
    await trio.testing.wait_all_tasks_blocked()
    return list(sink.events)


# -- (1) full life cycle ----------------------------------------------------------------

async def test_full_lifecycle_and_events(lab: Lab) -> None:
    sink = await lab.start_sink()
    cid = lab.new_id("life")
    bundle = lab.bundle(cid, ["sh", "-c", "exit 5"])

    shim = await lab.start_shim(cid, bundle)
    expected_path = socket_path_for(lab.containerd_address, NAMESPACE, cid)
    assert shim.start_stdout.decode() == "unix://" + expected_path
    assert shim.start_stderr == b""
    assert (bundle / "address").read_text() == shim.address
    assert os.path.exists(expected_path)

    created = await shim.create(cid, bundle)
    assert created.pid > 0
    assert created.pid == read_init_pid(bundle)
    state = await shim.state(cid)
    assert state.status == task_types_pb2.CREATED and state.pid == created.pid
    assert state.bundle == str(bundle)

    started = await shim.start(cid)
    assert started.pid == created.pid
    waited = await shim.wait(cid)
    assert waited.exit_status == 5
    assert waited.exited_at.seconds > 0
    state = await shim.state(cid)
    assert state.status == task_types_pb2.STOPPED and state.exit_status == 5

    deleted = await shim.delete(cid)
    assert deleted.pid == created.pid
    assert deleted.exit_status == 5
    assert deleted.exited_at == waited.exited_at
    await expect_error(Code.NOT_FOUND, shim.state(cid))

    await shim.shutdown(cid)
    await shim_exits(shim)
    assert not os.path.exists(expected_path), "shim socket left behind"
    assert mounts_under(lab.tmp) == []

    # containerd 1.6 then runs the delete action: answered from what the clean Delete left
    result = await lab.run_delete(cid, bundle)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    answer = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert (answer.pid, answer.exit_status, answer.exited_at) == (created.pid, 5, waited.exited_at)

    events = await sink.wait_count(4)
    events = await all_events(sink, shim)  # the shim has exited: nothing more can come
    assert [e.topic for e in events] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert [e.type_url for e in events] == [
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskExit",
        "containerd.events.TaskDelete",
    ]
    for e in events:
        assert e.namespace == NAMESPACE
        assert e.metadata.get(NAMESPACE_HEADER) == [NAMESPACE]
        assert e.event is not None and e.event.container_id == cid
        assert e.event.pid == created.pid
    create, _start, exit, delete = (e.event for e in events)
    assert create.bundle == str(bundle)
    assert list(create.rootfs) == []
    assert exit.id == cid and exit.exit_status == 5 and exit.exited_at == waited.exited_at
    assert delete.exit_status == 5 and delete.exited_at == waited.exited_at


async def test_delete_of_created_task_kills_init_without_exit_event(lab: Lab) -> None:
    sink = await lab.start_sink()
    cid = lab.new_id("created")
    bundle = lab.bundle(cid, ["sleep", "30"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle)
    deleted = await shim.delete(cid)
    assert deleted.pid == created.pid
    assert deleted.exit_status == 137  # runc delete --force killed the waiting init
    await shim.shutdown(cid)
    await shim_exits(shim)
    await sink.wait_count(2)
    # anything wrongly queued after delete (an exit for the killed init) was sent before the shim exited
    events = await all_events(sink, shim)
    assert [e.topic for e in events] == ["/tasks/create", "/tasks/delete"]
    assert sink.events[1].event.exit_status == 137


async def test_bind_mount_rootfs_mounted_and_unmounted(lab: Lab) -> None:
    sink = await lab.start_sink()
    cid = lab.new_id("bind")
    source = lab.busybox_dir()
    bundle = lab.bundle(cid, ["sh", "-c", "test -x /bin/busybox && exit 7"], rootfs="empty")
    rootfs = bundle / "rootfs"
    assert list(rootfs.iterdir()) == []

    shim = await lab.start_shim(cid, bundle)
    mount = mount_pb2.Mount(type="bind", source=str(source), options=["rbind", "rw"])

    # a Create that runc rejects must not leave the rootfs mounted
    good_config = (bundle / "config.json").read_text()
    (bundle / "config.json").write_text(good_config.replace('"sh",', '"/nonexistent",', 1))
    await expect_error(Code.UNKNOWN, shim.create(cid, bundle, rootfs=[mount]), contains="/nonexistent")
    assert mounts_under(lab.tmp) == [], "failed Create left the rootfs mounted"
    (bundle / "config.json").write_text(good_config)

    created = await shim.create(cid, bundle, rootfs=[mount])
    assert str(rootfs) in mounts_under(rootfs), "shim did not mount the rootfs"
    assert (rootfs / "bin" / "busybox").exists()
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 7  # the container saw busybox through the mount
    await shim.delete(cid)
    assert mounts_under(lab.tmp) == [], "shim left the rootfs mounted"
    assert list(rootfs.iterdir()) == []
    assert (source / "bin" / "busybox").exists()

    await shim.shutdown(cid)
    await shim_exits(shim)
    events = await sink.wait_count(4)
    create = events[0].event
    assert events[0].topic == "/tasks/create" and create.pid == created.pid
    assert [(m.type, m.source, list(m.options)) for m in create.rootfs] == [
        ("bind", str(source), ["rbind", "rw"])]


# -- (2) error codes -----------------------------------------------------------------------

async def test_error_codes(lab: Lab) -> None:
    await lab.start_sink()
    cid = lab.new_id("err")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)

    async def still_serving() -> None:
        reply = await shim.connect(cid)
        assert reply.shim_pid == shim.pid

    # unknown id
    await expect_error(Code.NOT_FOUND, shim.state("no-such-id"))
    await still_serving()

    # nonexistent bundle
    await expect_error(Code.INVALID_ARGUMENT, shim.create(cid, lab.tmp / "missing-bundle"))
    await still_serving()

    # runc fails at create: invalid config.json, then an executable that does not exist
    bad_id = lab.new_id("badcfg")
    bad = lab.bundle(bad_id, ["true"])
    (bad / "config.json").write_text("{ this is not json")
    err = await expect_error(Code.UNKNOWN, shim.create(bad_id, bad))
    # the OCI runtime's own words (runc: Go's encoding/json), as the Go shim reports them
    assert BAD_CONFIG_ERROR[os.path.basename(lab.runtime)] in err.message, err.message
    await still_serving()
    noexec_id = lab.new_id("noexec")
    noexec = lab.bundle(noexec_id, ["/nonexistent"])
    err = await expect_error(Code.UNKNOWN, shim.create(noexec_id, noexec))
    assert "/nonexistent" in err.message and "no such file or directory" in err.message.lower(), err.message
    await expect_error(Code.NOT_FOUND, shim.state(noexec_id))  # the failed id is released
    await still_serving()

    # the same id twice
    created = await shim.create(cid, bundle)
    await expect_error(Code.ALREADY_EXISTS, shim.create(cid, bundle))
    assert (await shim.state(cid)).pid == created.pid

    # Start twice
    await shim.start(cid)
    await expect_error(Code.FAILED_PRECONDITION, shim.start(cid))
    assert (await shim.state(cid)).status == task_types_pb2.RUNNING

    # Delete while running
    await expect_error(Code.FAILED_PRECONDITION, shim.delete(cid))
    assert (await shim.state(cid)).status == task_types_pb2.RUNNING

    # Kill after exit
    await shim.kill(cid, signal.SIGKILL)
    assert (await shim.wait(cid)).exit_status == 137
    await expect_error(Code.NOT_FOUND, shim.kill(cid, signal.SIGKILL))
    assert (await shim.state(cid)).status == task_types_pb2.STOPPED

    # unknown method, garbage payload
    await expect_error(Code.UNIMPLEMENTED, shim.call("Bogus", shim_pb2.StateRequest(id=cid)))
    await still_serving()
    with pytest.raises(TTRPCError) as info:
        with trio.fail_after(EVENTUALLY):
            await shim.client.call("containerd.task.v2.Task", "Create", b"\xff\xfe garbage \x00\x01")
    assert info.value.code == Code.INVALID_ARGUMENT, info.value
    await still_serving()

    # raw garbage on a separate connection: that connection is closed, ours is not
    raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await raw.connect(shim.socket_path)
        await raw.send(b"\xff" * 64 + b"this is not ttrpc\r\n" * 4)
        with trio.fail_after(EVENTUALLY):
            while True:
                try:
                    data = await raw.recv(4096)
                except ConnectionResetError:
                    break
                if not data:
                    break
    finally:
        raw.close()
    await still_serving()

    assert (await shim.delete(cid)).exit_status == 137
    await shim.shutdown(cid)
    await shim_exits(shim)


# -- (3) Shutdown with a live container -----------------------------------------------------

async def test_shutdown_with_live_container_keeps_serving(lab: Lab) -> None:
    await lab.start_sink()
    cid = lab.new_id("live")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle)
    await shim.start(cid)

    await shim.shutdown(cid, now=False)
    # Had the Shutdown started the exit, the shim would have stopped accepting and
    # closed its socket before answering anything after it: a call on a connection
    # opened after the Shutdown was answered shows it did not.
    client2 = await shim.open_client()  # new connections are still accepted
    assert (await shim.call("Connect", shim_pb2.ConnectRequest(id=cid), shim_pb2.ConnectResponse,
                            client=client2)).task_pid == created.pid
    state = await shim.state(cid)
    assert state.status == task_types_pb2.RUNNING and state.pid == created.pid
    assert pid_alive(shim.pid)
    assert os.path.exists(shim.socket_path)
    assert listening_pids(shim.socket_path) == {shim.pid}
    assert "shutting down" not in shim.log(), shim.log()

    await shim.kill(cid)
    assert (await shim.wait(cid)).exit_status == 137
    await shim.delete(cid)
    await shim.shutdown(cid)
    await shim_exits(shim)
    assert not os.path.exists(shim.socket_path)


# -- (4) events survive containerd's events endpoint being down ------------------------------

async def test_events_not_lost_while_endpoint_down(lab: Lab) -> None:
    late_path = str(lab.tmp / "late.sock")
    cid = lab.new_id("late")
    bundle = lab.bundle(cid, ["sh", "-c", "exit 3"])
    shim = await lab.start_shim(cid, bundle, ttrpc_address=late_path)
    created = await shim.create(cid, bundle)
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 3
    await shim.delete(cid)

    # the shim has tried, and failed, to reach the endpoint: the events are queued, not sent
    await wait_until(lambda: "containerd events unreachable" in shim.log(),
                     message="the shim to find the events endpoint down")
    assert not os.path.exists(late_path)
    sink = await lab.start_sink(late_path)
    events = await sink.wait_count(4)

    await shim.shutdown(cid)
    await shim_exits(shim)
    events = await all_events(sink, shim)  # each exactly once: no duplicate from the retries
    assert [e.topic for e in events] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert all(e.event.container_id == cid and e.event.pid == created.pid for e in events)
    assert events[2].event.exit_status == 3 and events[3].event.exit_status == 3
    assert len(sink.events) == 4


# -- (5) Wait semantics ----------------------------------------------------------------------------

async def test_wait_after_exit_and_concurrent_wait_woken_by_kill(lab: Lab) -> None:
    await lab.start_sink()
    done_id = lab.new_id("done")
    done_bundle = lab.bundle(done_id, ["sh", "-c", "exit 9"])
    shim = await lab.start_shim(done_id, done_bundle)
    await shim.create(done_id, done_bundle)
    await shim.start(done_id)
    first = await shim.wait(done_id)
    assert first.exit_status == 9
    # answered from the recorded exit: nothing else is going to happen to wake it up
    again = await shim.wait(done_id)
    assert again.exit_status == 9 and again.exited_at == first.exited_at

    run_id = lab.new_id("run")
    run_bundle = lab.bundle(run_id, ["sleep", "1000"])
    created = await shim.create(run_id, run_bundle)
    await shim.start(run_id)
    # containerd multiplexes every call over one connection: a blocked Wait
    # must not hold up other calls on the same client
    same_conn: list = []

    async def same_conn_waiter() -> None:
        same_conn.append(await shim.wait(run_id, timeout=30))

    other = await shim.open_client()
    results: list = []

    async def waiter() -> None:
        results.append(await shim.wait(run_id, client=other, timeout=30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(same_conn_waiter)
        # both Waits are on the wire once every task here is blocked; a request sent after
        # them on the same connection is read after them, so once it is answered, a Wait
        # that returns without an exit would have been answered too
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(EVENTUALLY):
            assert (await shim.state(run_id)).status == task_types_pb2.RUNNING
            assert (await shim.call("Connect", shim_pb2.ConnectRequest(id=run_id), shim_pb2.ConnectResponse,
                                    client=other)).task_pid == created.pid
        await trio.testing.wait_all_tasks_blocked()
        assert results == [] and same_conn == [], "Wait on a running task returned early"
        assert pid_alive(created.pid)
        await shim.kill(run_id, signal.SIGKILL)
        with trio.fail_after(EVENTUALLY):
            while not (results and same_conn):
                await trio.sleep(0.02)
    assert results[0].exit_status == 137
    assert same_conn[0].exit_status == 137 and same_conn[0].exited_at == results[0].exited_at
    assert (await shim.wait(run_id)).exit_status == 137

    await shim.delete(run_id)
    await shim.delete(done_id)
    await shim.shutdown(done_id)
    await shim_exits(shim)


# -- (6) Pids, (7) Connect, (8) THP ------------------------------------------------------------------

async def test_pids_connect_and_thp(lab: Lab) -> None:
    await lab.start_sink()
    cid = lab.new_id("pids")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle)
    await shim.start(cid)
    init = created.pid
    assert init == read_init_pid(bundle)

    # (6) Pids
    reply = await shim.pids(cid)
    assert [p.pid for p in reply.processes] == [init]

    # (7) Connect: shim_pid is the process actually listening on the socket
    connected = await shim.connect(cid)
    listeners = listening_pids(shim.socket_path)
    assert listeners == {shim.pid}, (listeners, shim.pid)
    assert connected.shim_pid == shim.pid
    assert connected.task_pid == init

    # (8) THP: disabled in the shim, the host's (our) value in the container
    ours = thp_disabled(os.getpid())
    assert ours is not None, "kernel has no THP_enabled in /proc/PID/status"
    assert thp_disabled(shim.pid) == "0"
    assert thp_disabled(init) == ours

    await shim.kill(cid)
    assert (await shim.wait(cid)).exit_status == 137
    await shim.delete(cid)
    await shim.shutdown(cid)
    await shim_exits(shim)


# -- (8b) the OCI runtime is the session's (runc, or crun in the crun pass) -------------------------

async def test_container_runs_on_the_sessions_oci_runtime(lab: Lab) -> None:
    """In the crun pass (SHIM_RUNC_BINARY=crun) the direct tests must run crun, not runc."""
    await lab.start_sink()
    cid = lab.new_id("runtime")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle)
    binary = os.path.basename(lab.runtime)
    assert binary in RUNTIME_STATE_FILE, f"no state file known for {lab.runtime}"
    # what the shim recorded for the delete action ...
    assert (bundle / "runtime").read_text() == lab.runtime
    assert (bundle / "runc-root").read_text() == RUNC_ROOT
    # ... and who really created the container: each runtime keeps its own state file
    state_dir = Path(RUNC_ROOT) / cid
    assert RUNTIME_STATE_FILE[binary] in os.listdir(state_dir), (binary, os.listdir(state_dir))
    others = {f for b, f in RUNTIME_STATE_FILE.items() if b != binary}
    assert not others & set(os.listdir(state_dir)), (binary, os.listdir(state_dir))
    await shim.start(cid)
    state = await trio.run_process([lab.runtime, "--root", RUNC_ROOT, "state", cid], check=False,
                                   capture_stdout=True, capture_stderr=True)
    assert state.returncode == 0, state.stderr
    assert (json.loads(state.stdout)["id"], json.loads(state.stdout)["pid"]) == (cid, created.pid), state.stdout
    await shim.kill(cid)
    assert (await shim.wait(cid)).exit_status == 137
    await shim.delete(cid)
    assert not state_dir.exists()
    await shim.shutdown(cid)
    await shim_exits(shim)


# -- (9) the delete action after a dead shim ------------------------------------------------------------

async def test_delete_action_after_shim_killed(lab: Lab) -> None:
    await lab.start_sink()
    cid = lab.new_id("dead")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle)
    await shim.start(cid)
    init = read_init_pid(bundle)
    assert init == created.pid and pid_alive(init)

    socket_file = shim.address.removeprefix("unix://")
    os.kill(shim.pid, signal.SIGKILL)
    await shim_exits(shim)
    assert pid_alive(init), "container died with its shim"
    assert os.path.exists(socket_file), "a killed shim cannot remove its socket"

    result = await lab.run_delete(cid, bundle)
    assert result.returncode == 0, result.stderr
    reply = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert reply.exit_status == 137
    assert reply.pid == init
    assert reply.exited_at.seconds > 0

    state = subprocess.run([lab.runtime, "--root", RUNC_ROOT, "state", cid], capture_output=True)
    assert state.returncode != 0, f"{lab.runtime} container still exists: {state.stdout!r}"
    await wait_until(lambda: not pid_alive(init), EVENTUALLY, message=f"container init {init} to die")
    assert mounts_under(lab.tmp) == []
    assert not os.path.exists(socket_file), "delete must remove the dead shim's socket"
