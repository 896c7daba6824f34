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
