"""Task API calls ctr 1.6 cannot make, driven over ttrpc with the test playing
containerd (see integration/shim_driver.py): Update, the exec RPCs with
exec_id (Exec/Start/State/Wait/Kill/Delete/CloseIO/ResizePty), their error
codes, and the ``containerd.task.v3.Task`` service name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
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

from google.protobuf import any_pb2

from integration.harness import EVENTUALLY, pid_alive, wait_cmdline
from integration.shim_driver import (
    NAMESPACE,
    NAMESPACE_HEADER,
    Lab,
    Shim,
    expect_error,
    wait_until,
)
from shim.proto import runc_options_pb2, shim_pb2, task_types_pb2
from shim.ttrpc import Code, TTRPCError

# what containerd's typeurl registrations (runtime/typeurl.go) put on the wire
LINUX_RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
TASK_V3 = "containerd.task.v3.Task"
CGROUP_V1 = Path("/sys/fs/cgroup")


# -- fixtures --------------------------------------------------------------------------




async def running_task(lab: Lab, tag: str, args=("sleep", "100")) -> tuple[Shim, str, Path, int]:
    """A shim with one started container; (shim, id, bundle, init pid)."""
    cid = lab.new_id(tag)
    bundle = lab.bundle(cid, list(args))
    shim = await lab.start_shim(cid, bundle)
    created = await shim.create(cid, bundle)
    await shim.start(cid)
    return shim, cid, bundle, created.pid


async def finish(shim: Shim, cid: str) -> None:
    """Kill, wait, delete the init and let the shim exit (it must)."""
    state = await shim.state(cid)
    if state.status != task_types_pb2.STOPPED:
        await shim.kill(cid, signal.SIGKILL)
    await shim.wait(cid)
    await shim.delete(cid)
    await shim.shutdown(cid)
    await wait_until(lambda: not pid_alive(shim.pid), EVENTUALLY, message=f"shim {shim.pid} to exit")


def process_spec(bundle: Path, args: list[str]) -> any_pb2.Any:
    """The container's process spec with other args, as containerd sends it for Exec."""
    process = json.loads((bundle / "config.json").read_text())["process"]
    process["args"] = args
    return any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(process).encode())


class Fifo:
    """A fifo the test holds open read-write (as containerd's cio does): never EOF, never ENXIO."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.data = bytearray()

    def read(self) -> bytes:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.data += chunk
        return bytes(self.data)

    async def wait_for(self, expected: bytes, timeout: float = 10.0) -> bytes:
        return await wait_until(lambda: self.read() == expected and self.data, timeout,
                                message=f"{expected!r} on {self.path} (have {bytes(self.data)!r})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def fifos(lab):
    made: list[Fifo] = []

    def make(name: str) -> Fifo:
        f = Fifo(lab.tmp / name)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


async def call(shim: Shim, method: str, request, reply_type=None, service: str | None = None):
    """A call on any task service name (Shim.call always uses v2)."""
    if service is None:
        return await shim.call(method, request, reply_type)
    with trio.fail_after(30):
        data = await shim.client.call(service, method, request.SerializeToString(),
                                      metadata=[(NAMESPACE_HEADER, NAMESPACE)])
    return reply_type.FromString(data) if reply_type is not None else data


async def exec_(shim: Shim, cid: str, exec_id: str, spec: any_pb2.Any, *, stdin="", stdout="", stderr=""):
    await shim.call("Exec", shim_pb2.ExecProcessRequest(
        id=cid, exec_id=exec_id, spec=spec, stdin=stdin, stdout=stdout, stderr=stderr))


async def start_exec(shim: Shim, cid: str, exec_id: str) -> int:
    return (await shim.call("Start", shim_pb2.StartRequest(id=cid, exec_id=exec_id), shim_pb2.StartResponse)).pid


async def state_exec(shim: Shim, cid: str, exec_id: str) -> shim_pb2.StateResponse:
    return await shim.call("State", shim_pb2.StateRequest(id=cid, exec_id=exec_id), shim_pb2.StateResponse)


async def wait_exec(shim: Shim, cid: str, exec_id: str) -> shim_pb2.WaitResponse:
    return await shim.call("Wait", shim_pb2.WaitRequest(id=cid, exec_id=exec_id), shim_pb2.WaitResponse)


async def delete_exec(shim: Shim, cid: str, exec_id: str) -> shim_pb2.DeleteResponse:
    return await shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=exec_id), shim_pb2.DeleteResponse)


def cgroup_dir(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_V1 / controllers / path.lstrip("/")
    pytest.skip(f"no cgroup v1 {controller} hierarchy")


# -- Update -------------------------------------------------------------------------------------

async def test_update_sets_cgroup_limits_and_rejects_garbage(lab: Lab) -> None:
    await lab.start_sink()
    shim, cid, _, init = await running_task(lab, "upd")
    memory, cpu = cgroup_dir(init, "memory"), cgroup_dir(init, "cpu")
    assert memory.parts[-2:] == (NAMESPACE, cid)  # the spec's cgroupsPath
    limit, shares = memory / "memory.limit_in_bytes", cpu / "cpu.shares"
    assert (int(limit.read_text()), int(shares.read_text())) != (67108864, 512)

    resources = {"memory": {"limit": 67108864}, "cpu": {"shares": 512}}
    await shim.call("Update", shim_pb2.UpdateTaskRequest(
        id=cid, resources=any_pb2.Any(type_url=LINUX_RESOURCES_URL, value=json.dumps(resources).encode())))
    assert int(limit.read_text()) == 67108864
    assert int(shares.read_text()) == 512

    err = await expect_error(Code.UNKNOWN, shim.call("Update", shim_pb2.UpdateTaskRequest(
        id=cid, resources=any_pb2.Any(type_url=LINUX_RESOURCES_URL, value=b"{not json"))))
    assert "runc update" in err.message, err.message
    assert (int(limit.read_text()), int(shares.read_text())) == (67108864, 512)
    await expect_error(Code.NOT_FOUND, shim.call("Update", shim_pb2.UpdateTaskRequest(id="no-such-id")))
    # the shim keeps serving, the task keeps running
    assert (await shim.connect(cid)).task_pid == init
    assert (await shim.state(cid)).status == task_types_pb2.RUNNING

    await shim.kill(cid, signal.SIGKILL)
    await shim.wait(cid)
    await expect_error(Code.FAILED_PRECONDITION, shim.call("Update", shim_pb2.UpdateTaskRequest(
        id=cid, resources=any_pb2.Any(type_url=LINUX_RESOURCES_URL, value=json.dumps(resources).encode()))))
    await finish(shim, cid)


# -- exec ---------------------------------------------------------------------------------------

async def test_exec_lifecycle_state_and_events(lab: Lab, fifos) -> None:
    sink = await lab.start_sink()
    shim, cid, bundle, init = await running_task(lab, "exec")
    out, err = fifos("e1-stdout"), fifos("e1-stderr")

    await exec_(shim, cid, "e1", process_spec(bundle, ["sh", "-c", "echo hi; echo err >&2; exit 3"]),
                stdout=out.path, stderr=err.path)
    state = await state_exec(shim, cid, "e1")
    assert (state.id, state.exec_id, state.status, state.pid) == ("e1", "e1", task_types_pb2.CREATED, 0)
    assert (state.stdin, state.stdout, state.stderr, state.terminal) == ("", out.path, err.path, False)
    assert state.bundle == str(bundle)

    pid = await start_exec(shim, cid, "e1")
    assert pid > 0 and pid != init
    waited = await wait_exec(shim, cid, "e1")
    assert waited.exit_status == 3
    assert out.read() == b"hi\n" and err.read() == b"err\n"
    state = await state_exec(shim, cid, "e1")
    assert (state.status, state.pid, state.exit_status) == (task_types_pb2.STOPPED, pid, 3)
    assert state.exited_at == waited.exited_at
    assert (await shim.state(cid)).status == task_types_pb2.RUNNING  # the init is untouched

    deleted = await delete_exec(shim, cid, "e1")
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (pid, 3, waited.exited_at)
    await expect_error(Code.NOT_FOUND, state_exec(shim, cid, "e1"))
    assert not (bundle / "e1.pid").exists()

    await finish(shim, cid)
    events = await sink.wait_count(7)
    assert [e.topic for e in events] == [
        "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
        "/tasks/exit", "/tasks/exit", "/tasks/delete"]  # deleting an exec publishes nothing
    added, started, exec_exit, init_exit = (e.event for e in events[2:6])
    assert (added.container_id, added.exec_id) == (cid, "e1")
    assert (started.container_id, started.exec_id, started.pid) == (cid, "e1", pid)
    assert (exec_exit.container_id, exec_exit.id, exec_exit.pid) == (cid, "e1", pid)
    assert exec_exit.exit_status == 3 and exec_exit.exited_at == waited.exited_at
    assert (init_exit.id, init_exit.pid, init_exit.exit_status) == (cid, init, 137)


async def test_exec_spec_reaches_runc_and_not_the_process(lab: Lab, fifos) -> None:
    """The exec's process spec goes to runc as a memfd (``/proc/self/fd/N``), no file in the
    bundle: runc reads it (the args run) and the exec'd process does not inherit it."""
    await lab.start_sink()
    shim, cid, bundle, _ = await running_task(lab, "spec")
    out = fifos("fd-stdout")
    before = set(os.listdir(bundle))
    await exec_(shim, cid, "fd", process_spec(bundle, ["ls", "-l", "/proc/self/fd"]), stdout=out.path)
    await start_exec(shim, cid, "fd")
    assert (await wait_exec(shim, cid, "fd")).exit_status == 0
    listing = out.read()
    assert b" 1 -> " in listing and b"memfd" not in listing and b"runc-process" not in listing, listing
    await delete_exec(shim, cid, "fd")
    assert set(os.listdir(bundle)) == before
    await finish(shim, cid)


async def test_running_exec_state_pids_kill_resize_delete(lab: Lab, fifos) -> None:
    await lab.start_sink()
    shim, cid, bundle, init = await running_task(lab, "kill")
    out = fifos("k-stdout")
    await exec_(shim, cid, "sleeper", process_spec(bundle, ["sleep", "101"]), stdout=out.path)
    pid = await start_exec(shim, cid, "sleeper")
    # Start returns once the process exists, maybe still inside execve (empty cmdline)
    assert await trio.to_thread.run_sync(wait_cmdline, pid, ["sleep", "101"]) == ["sleep", "101"]

    state = await state_exec(shim, cid, "sleeper")
    assert (state.id, state.exec_id, state.status, state.pid) == ("sleeper", "sleeper", task_types_pb2.RUNNING, pid)
    assert (state.stdin, state.stdout, state.stderr) == ("", out.path, "")

    pids = {p.pid: p for p in (await shim.pids(cid)).processes}
    assert set(pids) == {init, pid}
    assert pids[init].info.type_url == ""
    assert pids[pid].info.type_url == "containerd.runc.v1.ProcessDetails"
    assert runc_options_pb2.ProcessDetails.FromString(pids[pid].info.value).exec_id == "sleeper"

    # no terminal: a no-op, as in the Go shim (execProcess.Resize with no console)
    await shim.call("ResizePty", shim_pb2.ResizePtyRequest(id=cid, exec_id="sleeper", width=80, height=24))
    await expect_error(Code.NOT_FOUND, shim.call("ResizePty", shim_pb2.ResizePtyRequest(
        id=cid, exec_id="no-such-exec", width=80, height=24)))
    await expect_error(Code.FAILED_PRECONDITION, delete_exec(shim, cid, "sleeper"))
    assert pid_alive(pid)

    await shim.call("Kill", shim_pb2.KillRequest(id=cid, exec_id="sleeper", signal=signal.SIGKILL))
    assert (await wait_exec(shim, cid, "sleeper")).exit_status == 137
    assert (await state_exec(shim, cid, "sleeper")).status == task_types_pb2.STOPPED
    await expect_error(Code.NOT_FOUND, shim.call("Kill", shim_pb2.KillRequest(
        id=cid, exec_id="sleeper", signal=signal.SIGKILL)))
    state = await shim.state(cid)
    assert (state.status, state.pid) == (task_types_pb2.RUNNING, init) and pid_alive(init)
    assert (await delete_exec(shim, cid, "sleeper")).exit_status == 137
    await finish(shim, cid)


def open_writer(path: Path) -> int | None:
    """Open a fifo for writing as containerd's cio does: ENXIO until someone reads."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


async def test_close_io_ends_stdin_once_client_writers_are_gone(lab: Lab, fifos) -> None:
    """Go semantics: the shim holds its own writer on the stdin fifo, so a client
    closing (or re-opening) the fifo does not end stdin; CloseIO drops that
    writer, and the process sees EOF once the clients' writers are gone too."""
    await lab.start_sink()
    shim, cid, bundle, _ = await running_task(lab, "closeio")
    stdin = lab.tmp / "c-stdin"
    os.mkfifo(stdin)
    out = fifos("c-stdout")
    await exec_(shim, cid, "cat", process_spec(bundle, ["cat"]), stdin=str(stdin), stdout=out.path)
    await start_exec(shim, cid, "cat")

    expected = b""
    for word in (b"one\n", b"two\n"):  # a client attaching, writing, detaching -- twice
        fd = open_writer(stdin)
        assert fd is not None, "the shim has no reader on the stdin fifo"
        try:
            os.write(fd, word)
            expected += word
            await out.wait_for(expected)
        finally:
            os.close(fd)
    assert (await state_exec(shim, cid, "cat")).status == task_types_pb2.RUNNING

    fd = open_writer(stdin)
    try:
        await shim.call("CloseIO", shim_pb2.CloseIORequest(id=cid, exec_id="cat", stdin=True))
        os.write(fd, b"three\n")  # our writer is still open: stdin still flows
        expected += b"three\n"
        await out.wait_for(expected)
        assert (await state_exec(shim, cid, "cat")).status == task_types_pb2.RUNNING
    finally:
        os.close(fd)
    waited = await wait_exec(shim, cid, "cat")  # last writer gone: EOF
    assert waited.exit_status == 0
    assert out.read() == expected
    await delete_exec(shim, cid, "cat")
    await finish(shim, cid)


async def test_close_io_during_start_keeps_written_data(lab: Lab, fifos) -> None:
    """ctr's sequence for ``ctr task exec ... < file``: its stdin copy opens the
    fifo as soon as the shim has a reader on it, writes, closes, and calls
    CloseIO -- which then arrives while Start (runc exec) is in flight.
    (Up to 02f3358 the shim closed the process's stdin pipe there: data lost.)"""
    await lab.start_sink()
    shim, cid, bundle, _ = await running_task(lab, "closeio2")
    out = fifos("c2-stdout")
    stdin = lab.tmp / "c2-stdin"
    os.mkfifo(stdin)
    await exec_(shim, cid, "cat", process_spec(bundle, ["cat"]), stdin=str(stdin), stdout=out.path)
    started: list[int] = []

    async def start() -> None:
        started.append(await start_exec(shim, cid, "cat"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        fd = await wait_until(lambda: open_writer(stdin), 10, interval=0.001,
                              message="the shim to open the stdin fifo")
        try:
            os.write(fd, b"data\n")
        finally:
            os.close(fd)
        await shim.call("CloseIO", shim_pb2.CloseIORequest(id=cid, exec_id="cat", stdin=True))
        close_io_before_start_returned = not started
    assert started
    waited = await wait_exec(shim, cid, "cat")
    assert (waited.exit_status, out.read()) == (0, b"data\n")
    print("CloseIO landed during Start:", close_io_before_start_returned)
    await delete_exec(shim, cid, "cat")
    await finish(shim, cid)


async def test_resize_pty_before_start_is_a_no_op(lab: Lab) -> None:
    """The Go shim: execCreatedState.Resize -> execProcess.resize, which returns nil while the
    exec has no console. So: success, and nothing else -- the exec is not started, no event,
    and it starts and runs normally afterwards."""
    sink = await lab.start_sink()
    shim, cid, bundle, init = await running_task(lab, "resize")
    await exec_(shim, cid, "later", process_spec(bundle, ["sleep", "101"]))
    await shim.call("ResizePty", shim_pb2.ResizePtyRequest(id=cid, exec_id="later", width=80, height=24))
    state = await state_exec(shim, cid, "later")
    assert (state.status, state.pid, state.terminal) == (task_types_pb2.CREATED, 0, False)
    # the init has no terminal either: the same no-op
    await shim.call("ResizePty", shim_pb2.ResizePtyRequest(id=cid, width=100, height=40))
    assert ((await shim.state(cid)).status, (await shim.state(cid)).pid) == (task_types_pb2.RUNNING, init)

    pid = await start_exec(shim, cid, "later")
    assert pid > 0 and pid != init
    assert await trio.to_thread.run_sync(wait_cmdline, pid, ["sleep", "101"]) == ["sleep", "101"]
    assert (await state_exec(shim, cid, "later")).status == task_types_pb2.RUNNING
    await shim.call("Kill", shim_pb2.KillRequest(id=cid, exec_id="later", signal=signal.SIGKILL))
    assert (await wait_exec(shim, cid, "later")).exit_status == 137
    await delete_exec(shim, cid, "later")
    await finish(shim, cid)
    # the shim has exited, so these are all its events: the resizes published nothing
    assert [e.topic for e in sink.events] == [
        "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
        "/tasks/exit", "/tasks/exit", "/tasks/delete"]
    started = sink.events[3].event
    assert (started.exec_id, started.pid) == ("later", pid)


async def test_exec_error_codes(lab: Lab) -> None:
    await lab.start_sink()
    shim, cid, bundle, init = await running_task(lab, "execerr")
    good = process_spec(bundle, ["sleep", "101"])

    await expect_error(Code.INVALID_ARGUMENT, exec_(
        shim, cid, "bad", any_pb2.Any(type_url=PROCESS_URL, value=b"\x00 not json")))
    await expect_error(Code.NOT_FOUND, state_exec(shim, cid, "bad"))  # nothing registered
    await expect_error(Code.INVALID_ARGUMENT, exec_(shim, cid, "", good))
    await expect_error(Code.NOT_FOUND, exec_(shim, "no-such-id", "x", good))
    await expect_error(Code.NOT_FOUND, shim.call("Start", shim_pb2.StartRequest(id=cid, exec_id="never-added")))
    await expect_error(Code.NOT_FOUND, wait_exec(shim, cid, "never-added"))
    await expect_error(Code.NOT_FOUND, shim.call("CloseIO", shim_pb2.CloseIORequest(
        id=cid, exec_id="never-added", stdin=True)))

    await exec_(shim, cid, "twice", good)
    await expect_error(Code.ALREADY_EXISTS, exec_(shim, cid, "twice", good), contains="already exists")
    await start_exec(shim, cid, "twice")
    await expect_error(Code.FAILED_PRECONDITION, start_exec(shim, cid, "twice"))

    # runc exec fails: runc's words come back, the exec stays deletable
    await exec_(shim, cid, "missing", process_spec(bundle, ["/no/such/binary"]))
    err = await expect_error(Code.UNKNOWN, start_exec(shim, cid, "missing"))
    assert "/no/such/binary" in err.message and "no such file or directory" in err.message.lower(), err.message
    await delete_exec(shim, cid, "missing")
    await expect_error(Code.NOT_FOUND, state_exec(shim, cid, "missing"))

    assert (await shim.connect(cid)).task_pid == init
    # the init's exit waits for the running exec's, which the kernel kills with it
    await shim.kill(cid, signal.SIGKILL)
    assert (await wait_exec(shim, cid, "twice")).exit_status == 137
    assert (await shim.wait(cid)).exit_status == 137
    await expect_error(Code.FAILED_PRECONDITION, exec_(shim, cid, "late", good))
    await delete_exec(shim, cid, "twice")
    await finish(shim, cid)


# -- containerd.task.v3.Task -------------------------------------------------------------------

async def test_task_v3_service_name(lab: Lab) -> None:
    await lab.start_sink()
    shim, cid, bundle, init = await running_task(lab, "v3")
    for service in (None, TASK_V3):
        connected = await call(shim, "Connect", shim_pb2.ConnectRequest(id=cid), shim_pb2.ConnectResponse, service)
        assert (connected.shim_pid, connected.task_pid) == (shim.pid, init)
        state = await call(shim, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse, service)
        assert (state.id, state.pid, state.status, state.bundle) == (cid, init, task_types_pb2.RUNNING, str(bundle))
    with pytest.raises(TTRPCError) as info:
        await call(shim, "State", shim_pb2.StateRequest(id="no-such-id"), shim_pb2.StateResponse, TASK_V3)
    assert info.value.code == Code.NOT_FOUND
    with pytest.raises(TTRPCError) as info:
        await call(shim, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse, "containerd.task.v4.Task")
    assert info.value.code == Code.UNIMPLEMENTED
    await call(shim, "Kill", shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL), None, TASK_V3)
    waited = await call(shim, "Wait", shim_pb2.WaitRequest(id=cid), shim_pb2.WaitResponse, TASK_V3)
    assert waited.exit_status == 137
    await finish(shim, cid)


async def test_failed_exec_start_releases_its_wait_and_shutdown_now_spares_a_live_task(lab: Lab) -> None:
    """An exec that never starts must not block Wait, Delete or the shim's exit."""
    await lab.start_sink()
    shim, cid, bundle, init = await running_task(lab, "execfail")
    await exec_(shim, cid, "ghost", process_spec(bundle, ["/no/such/binary"]))
    waited: list[shim_pb2.WaitResponse] = []

    async def wait_ghost() -> None:  # containerd has this Wait pending while it calls Start
        waited.append(await shim.call("Wait", shim_pb2.WaitRequest(id=cid, exec_id="ghost"), shim_pb2.WaitResponse))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_ghost)
        await trio.testing.wait_all_tasks_blocked()  # the Wait is on the wire, ahead of the Start
        assert not waited
        await expect_error(Code.UNKNOWN, start_exec(shim, cid, "ghost"), contains="exec failed")
        with trio.fail_after(EVENTUALLY):
            while not waited:
                await trio.sleep(0.02)
    assert waited[0].exit_status == 255
    assert (await state_exec(shim, cid, "ghost")).status == task_types_pb2.STOPPED
    await shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id="ghost"), shim_pb2.DeleteResponse)

    # Shutdown(now) while the init runs: answered, and the shim goes on serving (never exits,
    # never kills, while a container exists: issue 11 item 4); the pending Wait still gets
    # the init's exit, and the shim leaves once the task is deleted.
    init_waited: list[shim_pb2.WaitResponse] = []

    async def wait_init() -> None:
        init_waited.append(await shim.call("Wait", shim_pb2.WaitRequest(id=cid), shim_pb2.WaitResponse))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_init)
        await trio.testing.wait_all_tasks_blocked()  # the Wait is on the wire, ahead of the Shutdown
        await shim.shutdown(cid, now=True)
        assert (await shim.connect(cid)).task_pid == init  # answered after the Shutdown: still serving
        assert pid_alive(init) and (await shim.state(cid)).status == task_types_pb2.RUNNING
        await shim.kill(cid, signal.SIGKILL)
    assert init_waited[0].exit_status == 137
    await shim.delete(cid)
    await shim.shutdown(cid, now=True)
    await wait_until(lambda: not pid_alive(shim.pid), EVENTUALLY, message=f"shim {shim.pid} to exit")
