"""Concurrent requests on one container, interleaved deterministically with a fake OCI runtime.

Each test parks one runtime call (FakeRuntime.gate), sends a second request while it is
parked, and checks what the runtime was asked and which events went out. Without the
per-process lock the second request ran its runtime call in the middle of the first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from fake_runtime import Harness, make_container

from shim.common.errors import FailedPrecondition, NotFound, ShimError
from shim.daemon import events as ev
from shim.daemon.process import State
from shim.daemon.stdio import StdioPaths

pytestmark = pytest.mark.trio


async def created(tmp_path: Path, nursery: trio.Nursery) -> Harness:
    h = make_container(str(tmp_path), nursery)
    await h.container.create()
    return h


async def running(tmp_path: Path, nursery: trio.Nursery) -> Harness:
    h = await created(tmp_path, nursery)
    await h.container.start()
    return h


async def outcome(call: Callable[[], Awaitable[object]]) -> str:
    """'ok' or the containerd error's class name: what a racing request got."""
    try:
        await call()
    except ShimError as e:
        return type(e).__name__
    return "ok"


async def race(
    h: Harness, nursery: trio.Nursery, parked: str, first: Callable[[], Awaitable[object]],
    second: Callable[[], Awaitable[object]],
) -> list[str]:
    """Run ``first`` until its runtime call ``parked`` is inside the runtime, send ``second``,
    let the runtime answer; the two outcomes once both are done."""
    gate = h.runtime.gate(parked)
    results = ["", ""]

    async def run(i: int, call: Callable[[], Awaitable[object]]) -> None:
        results[i] = await outcome(call)

    nursery.start_soon(run, 0, first)
    await gate.entered.wait()
    nursery.start_soon(run, 1, second)
    await trio.testing.wait_all_tasks_blocked()
    h.calls_while_parked = h.runtime.commands()
    gate.release.set()
    await trio.testing.wait_all_tasks_blocked()
    return results


async def test_delete_waits_for_start_in_flight_and_is_then_refused(tmp_path: Path) -> None:
    """Before: Delete of a CREATED task ran `runc delete --force` while `runc start` ran."""
    async with trio.open_nursery() as nursery:
        h = await created(tmp_path, nursery)
        results = await race(h, nursery, "start", h.container.start, h.container.delete)
        assert h.calls_while_parked == ["create", "start"]  # no delete while start runs
        assert results == ["ok", "FailedPrecondition"]
        assert h.runtime.commands() == ["create", "start"]
        assert h.container.init.state is State.RUNNING
        h.runtime.exit(h.runtime.init_pid, 0)
        await h.container.init.wait()
    assert h.events.topics() == [ev.TASK_CREATE, ev.TASK_START, ev.TASK_EXIT]


async def test_pause_and_resume_sent_together_both_apply_in_order(tmp_path: Path) -> None:
    """Before: Resume was checked while Pause's runc call ran (state still RUNNING): refused."""
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        results = await race(h, nursery, "pause", h.container.pause, h.container.resume)
        assert results == ["ok", "ok"]
        assert h.runtime.commands() == ["create", "start", "pause", "resume"]
        assert h.container.init.state is State.RUNNING
        h.runtime.exit(h.runtime.init_pid, 0)
    assert h.events.topics() == [ev.TASK_CREATE, ev.TASK_START, ev.TASK_PAUSED, ev.TASK_RESUMED, ev.TASK_EXIT]


async def test_an_exit_during_start_goes_out_after_task_start(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = await created(tmp_path, nursery)
        gate = h.runtime.gate("start")
        nursery.start_soon(h.container.start)
        await gate.entered.wait()
        h.runtime.exit(h.runtime.init_pid, 3)  # the process dies while runc start runs
        await trio.testing.wait_all_tasks_blocked()
        assert h.events.topics() == [ev.TASK_CREATE]
        gate.release.set()
        exit = await h.container.init.wait()
    assert exit.status == 3
    assert h.events.topics() == [ev.TASK_CREATE, ev.TASK_START, ev.TASK_EXIT]


async def test_kill_racing_delete_gets_a_documented_code(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        h.runtime.exit(h.runtime.init_pid, 137)
        await h.container.init.wait()
        results = await race(h, nursery, "delete", h.container.delete, lambda: h.container.kill("", 9))
    assert results == ["ok", "NotFound"]
    assert "kill" not in h.runtime.commands()  # a stopped task is never signalled
    assert h.events.topics()[-2:] == [ev.TASK_EXIT, ev.TASK_DELETE]


async def test_state_is_stopped_at_reap_and_delete_waits_for_the_exit_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reaped means STOPPED at once (State, Kill see a dead process); TaskExit still goes
    out before TaskDelete, whenever Delete comes."""
    from shim.daemon import exits

    hold = trio.Event()

    async def output_still_draining(container: object, process: object) -> None:
        await hold.wait()

    monkeypatch.setattr(exits, "_drain", output_still_draining)
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        init = h.container.init
        h.runtime.exit(h.runtime.init_pid, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert init.state is State.STOPPED and init.exit is not None and init.exit.status == 1
        with pytest.raises(NotFound):
            await h.container.kill("", 15)
        deleted = trio.Event()

        async def delete() -> None:
            await h.container.delete()
            deleted.set()

        nursery.start_soon(delete)
        await trio.testing.wait_all_tasks_blocked()
        assert not deleted.is_set() and ev.TASK_EXIT not in h.events.topics()
        hold.set()
        await deleted.wait()
    assert h.events.topics() == [ev.TASK_CREATE, ev.TASK_START, ev.TASK_EXIT, ev.TASK_DELETE]


async def test_exec_start_and_delete_of_the_exec_race(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        c = h.container
        c.add_exec("e1", StdioPaths(), json.dumps({"args": ["true"], "cwd": "/"}).encode())
        results = await race(h, nursery, "exec", lambda: c.start("e1"), lambda: c.delete("e1"))
        assert results == ["ok", "FailedPrecondition"]
        assert c.execs["e1"].state is State.RUNNING
        h.runtime.exit(h.runtime.exec_pids[0], 0)
        await c.execs["e1"].wait()
        await c.delete("e1")
        h.runtime.exit(h.runtime.init_pid, 0)
    assert h.events.topics() == [
        ev.TASK_CREATE, ev.TASK_START, ev.TASK_EXEC_ADDED, ev.TASK_EXEC_STARTED, ev.TASK_EXIT, ev.TASK_EXIT,
    ]


async def test_a_cancelled_exec_start_kills_what_runc_started(tmp_path: Path) -> None:
    """A Start cut by its deadline after runc exec made the process: the process must not
    be left running while the exec is recorded as never started (exit 255)."""
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        c = h.container
        c.add_exec("e1", StdioPaths(), b'{"args": ["sleep", "9"]}')
        killed: list[int] = []

        async def exec_then_hang(id: str, spec: str, pid_file: str, stdio: object, **_: object) -> None:
            h.runtime.exec_pids.append(h.runtime._new_pid(pid_file))  # the process exists
            await trio.sleep_forever()  # runc has not returned when the deadline hits

        h.runtime.exec = exec_then_hang  # type: ignore[method-assign]
        import shim.daemon.container as container_module

        def fake_kill(pid: int, sig: int) -> None:
            killed.append(pid)
            h.runtime.exit(pid, 128 + sig)

        original = container_module.os.kill
        container_module.os.kill = fake_kill  # type: ignore[assignment]
        try:
            with trio.move_on_after(0.05):
                await c.start("e1")
        finally:
            container_module.os.kill = original  # type: ignore[assignment]
        exit = await c.execs["e1"].wait()
        assert killed == h.runtime.exec_pids
        assert exit.status == 137  # its real end, not "never started" (255)
        h.runtime.exit(h.runtime.init_pid, 0)
    assert ev.TASK_EXEC_STARTED not in h.events.topics()


async def test_a_cancelled_create_is_discarded(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = make_container(str(tmp_path), nursery)
        h.runtime.gate("create")  # never released: the deadline cuts runc create
        with trio.move_on_after(0.05) as scope:
            await h.container.create()
        assert scope.cancelled_caught
    assert h.runtime.commands() == ["create", "delete"]  # runc delete --force after the cut create
    assert h.runtime.calls[-1] == ("delete", "c1", "--force")


async def test_refused_operations_name_the_state(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = await created(tmp_path, nursery)
        with pytest.raises(FailedPrecondition, match="cannot pause a created process"):
            await h.container.pause()
        await h.container.delete()
    assert h.runtime.calls[-1] == ("delete", "c1", "--force")
    assert h.events.topics() == [ev.TASK_CREATE, ev.TASK_DELETE]  # no exit for a never-started task


@pytest.mark.parametrize("config,kills_all", [
    (None, True),  # unreadable spec: kill what is left, as Go does
    ('{"linux": {"namespaces": [{"type": "mount"}]}}', True),  # the host's (or a shared) pid namespace
    ('{"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}}', True),  # joined
    ('{"linux": {"namespaces": [{"type": "pid"}]}}', False),  # its own: the kernel kills the rest
])
async def test_init_exit_kills_the_rest_unless_the_pid_namespace_is_its_own(
    tmp_path: Path, config: str | None, kills_all: bool
) -> None:
    async with trio.open_nursery() as nursery:
        h = make_container(str(tmp_path), nursery, config=config)
        await h.container.create()
        await h.container.start()
        h.runtime.exit(h.runtime.init_pid, 0)
        await h.container.init.wait()
    assert (("kill", "c1", "9") in h.runtime.calls) is kills_all


@pytest.mark.parametrize("config,kills_all", [
    ('{"linux": {"namespaces": [{"type": "mount"}]}}', True),
    ('{"linux": {"namespaces": [{"type": "pid"}]}}', False),
])
async def test_with_a_rootfs_the_pid_namespace_is_read_at_create_not_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, kills_all: bool
) -> None:
    """The rootfs mount's worker thread reads the spec too, so the init's exit goes out without
    a thread of its own: what the spec said at Create decides, even with the file gone since."""
    import os

    from shim.common.mount import MountSpec
    from shim.daemon import container as container_module

    monkeypatch.setattr(container_module, "mount_all", lambda mounts, target: None)
    monkeypatch.setattr(container_module, "unmount_all", lambda target: None)
    async with trio.open_nursery() as nursery:
        h = make_container(str(tmp_path), nursery, config=config)
        h.container.request.rootfs = [MountSpec("bind", str(tmp_path), ["rbind"])]
        await h.container.create()
        assert h.container.request.rootfs == []  # published with TaskCreate, not kept
        os.unlink(tmp_path / "config.json")  # unreadable now: would count as shared
        await h.container.start()
        h.runtime.exit(h.runtime.init_pid, 0)
        await h.container.init.wait()
    assert (("kill", "c1", "9") in h.runtime.calls) is kills_all


def _stat_fields(state: bytes, flags: int) -> list[bytes]:
    """/proc/<pid>/stat after the command name, as far as the flags field (the 7th)."""
    return [state, b"1", b"1", b"1", b"0", b"-1", str(flags).encode()]


async def test_exec_start_failing_while_the_init_is_dying_gets_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window behind the flaky integration test_200_concurrent_requests…: the task is
    SIGKILLed while an exec starts; its init, a pid-namespace init, stays inside the kernel's
    exit (state S, PF_EXITING) until every other process of its namespace is gone, including
    the one `runc exec` was starting, so runc exec fails while the init is neither reaped nor
    a zombie. Before: Unknown ("OCI runtime exec failed"), outside the documented codes."""
    from shim.common import lean

    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        c = h.container
        init_pid = h.runtime.init_pid
        monkeypatch.setattr(lean, "proc_stat", lambda pid: _stat_fields(b"S", 0x400100 | lean.PF_EXITING)
                            if pid == init_pid else [])
        c.add_exec("e1", StdioPaths(), b'{"args": ["true"]}')
        h.runtime.fail("exec", "unable to start container process: error executing setns process: exit status 1")
        with pytest.raises(FailedPrecondition, match="cannot exec in a stopped container"):
            await c.start("e1")
        assert not c.init.reaped
        h.runtime.exit(init_pid, 137)
        assert (await c.init.wait()).status == 137
    assert ev.TASK_EXEC_STARTED not in h.events.topics()


async def test_exec_start_failing_with_a_live_init_is_the_runtimes_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the check above: an init that is alive and not exiting (flags
    without PF_EXITING) leaves runc's failure as it is (Unknown, with runc's words)."""
    from shim.common import lean

    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        c = h.container
        init_pid = h.runtime.init_pid
        monkeypatch.setattr(lean, "proc_stat", lambda pid: _stat_fields(b"S", 0x400100) if pid == init_pid else [])
        c.add_exec("e1", StdioPaths(), b'{"args": ["nosuch"]}')
        h.runtime.fail("exec", 'exec: "nosuch": executable file not found in $PATH')
        with pytest.raises(ShimError, match="OCI runtime exec failed: exec: \"nosuch\"") as info:
            await c.start("e1")
        assert type(info.value) is ShimError and info.value.code == 2  # Unknown
        h.runtime.exit(init_pid, 0)


async def test_exec_created_while_the_init_exit_is_held_its_start_is_refused(tmp_path: Path) -> None:
    """containerd's TestIssue10589: exec1 is parked inside `runc exec`, so the init's exit is
    held; the init is SIGKILLed (and reaped); exec2 is created. As in Go, the task is still
    RUNNING while its exit is held (State, Create of an exec), and only exec2's Start is
    refused ("init process is not running"). Before: exec2's Create was refused
    ("cannot exec in a stopped container") and State said STOPPED."""
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        c = h.container
        c.add_exec("exec1", StdioPaths(), b'{"args": ["sleep", "301"]}')
        gate = h.runtime.gate("exec")
        results: list[str] = []

        async def start_exec1() -> None:
            results.append(await outcome(lambda: c.start("exec1")))

        nursery.start_soon(start_exec1)
        await gate.entered.wait()
        h.runtime.exit(h.runtime.init_pid, 137)  # SIGKILL; the shim reaps it at once
        await trio.testing.wait_all_tasks_blocked()
        assert c.init.reaped
        assert c.init.state is State.RUNNING and c.init.exit is None  # held: State says running
        c.add_exec("exec2", StdioPaths(), b'{"args": ["sleep", "302"]}')  # accepted, as in Go
        with pytest.raises(FailedPrecondition, match="init process is not running"):
            await c.start("exec2")
        assert h.runtime.commands().count("exec") == 1  # exec2 never reached the runtime
        assert ev.TASK_EXIT not in h.events.topics()
        h.runtime.fail("exec", "cannot exec in a stopped container")  # what runc says now
        gate.release.set()
        assert (await c.init.wait()).status == 137
        assert results == ["FailedPrecondition"]
        assert c.init.state is State.STOPPED
        await c.delete("exec1")
        await c.delete("exec2")
        await c.delete()
    assert h.events.topics() == [
        ev.TASK_CREATE, ev.TASK_START, ev.TASK_EXEC_ADDED, ev.TASK_EXEC_ADDED, ev.TASK_EXIT, ev.TASK_DELETE,
    ]


async def test_a_task_created_from_a_checkpoint_is_restorable_until_its_start(tmp_path: Path) -> None:
    """Restore is a state, not a flag read at Start: until Start restores it there is no
    process, so Exec, Update, Pause and Checkpoint are refused (before: Exec and Update were
    accepted and reached the runtime, which could only fail: Unknown). Start restores."""
    from shim.daemon.checkpoint import CheckpointRequest

    async with trio.open_nursery() as nursery:
        h = make_container(str(tmp_path), nursery, checkpoint=str(tmp_path / "image"))
        c = h.container
        await c.create()
        assert c.init.state is State.RESTORABLE
        with pytest.raises(FailedPrecondition, match="cannot exec in a restorable container"):
            c.add_exec("e1", StdioPaths(), b'{"args": ["true"]}')
        with pytest.raises(FailedPrecondition, match="cannot update a restorable process"):
            await c.update(b"{}")
        with pytest.raises(FailedPrecondition, match="cannot pause a restorable process"):
            await c.pause()
        with pytest.raises(FailedPrecondition, match="cannot checkpoint a restorable process"):
            await c.checkpoint(CheckpointRequest(path=str(tmp_path / "again")))
        assert h.runtime.commands() == []  # nothing reached the runtime: there is no container yet
        await c.start()
        assert c.init.state is State.RUNNING
        assert h.runtime.commands() == ["restore"]
        h.runtime.exit(h.runtime.init_pid, 0)
        await c.init.wait()


async def test_a_stale_exit_is_not_given_to_an_exec_that_reuses_its_pid(tmp_path: Path) -> None:
    """Issue 16: while one exec's ``runc exec`` is in flight (its hold open), an orphan is
    reaped with nobody watching it; a second exec whose process gets the same pid again must
    be running, not reported exited with the orphan's status."""
    with trio.fail_after(10):
        await _stale_exit_and_reused_pid(tmp_path)


async def _stale_exit_and_reused_pid(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = await running(tmp_path, nursery)
        c, rt = h.container, h.runtime
        c.add_exec("slow", StdioPaths(), json.dumps({"args": ["true"], "cwd": "/"}).encode())
        c.add_exec("reuser", StdioPaths(), json.dumps({"args": ["true"], "cwd": "/"}).encode())
        gate = rt.gate("exec")
        nursery.start_soon(c.start, "slow")
        await gate.entered.wait()  # the slow exec's hold is open
        reused = rt._next_pid
        rt.exit(reused, 137)  # an orphan with that pid dies and is reaped, unwatched
        assert await c.start("reuser") == reused  # the pid is handed out again
        await trio.testing.wait_all_tasks_blocked()
        assert c.process("reuser").state is State.RUNNING
        assert ev.TASK_EXIT not in h.events.topics()
        gate.release.set()
        await trio.testing.wait_all_tasks_blocked()
        for pid in (reused, rt.exec_pids[-1], rt.init_pid):  # end what the test started
            rt.exit(pid, 0)
