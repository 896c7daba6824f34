"""shim.daemon.reaper: exit_status, the pure ExitRouter, and one real Reaper run."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import trio
import trio.testing

from shim.daemon.reaper import Exit, ExitRouter, Reaper, exit_status


def exited(code: int) -> int:
    return code << 8


def signaled(signum: int, core: bool = False) -> int:
    return signum | (0x80 if core else 0)


@pytest.mark.parametrize("code", [0, 1, 7, 127, 255])
def test_exit_status_exited(code: int) -> None:
    raw = exited(code)
    assert os.WIFEXITED(raw) and os.WEXITSTATUS(raw) == code  # encoding sanity
    assert exit_status(raw) == code


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSEGV])
@pytest.mark.parametrize("core", [False, True])
def test_exit_status_signaled(signum: int, core: bool) -> None:
    raw = signaled(signum, core)
    assert os.WIFSIGNALED(raw) and os.WTERMSIG(raw) == signum
    assert exit_status(raw) == 128 + signum


def test_exit_status_stopped_is_255() -> None:
    raw = 0x7F | (signal.SIGSTOP << 8)
    assert os.WIFSTOPPED(raw)
    assert exit_status(raw) == 255


# --- ExitRouter --------------------------------------------------------------


def ex(pid: int, status: int = 0) -> Exit:
    return Exit(pid, status, 1.0)


async def test_exit_delivered_to_watch_once() -> None:
    r = ExitRouter()
    w = r.watch(10)
    assert r.watched == 1
    assert w.exit is None
    assert r.route(ex(10, 3)) is True
    assert w.exit == ex(10, 3)
    assert r.watched == 0
    # A later exit for the same pid (reused pid) does not reach the old watch.
    assert r.route(ex(10, 9)) is False
    assert w.exit == ex(10, 3)
    with trio.fail_after(1):
        assert await w.wait() == ex(10, 3)


async def test_wait_blocks_until_routed() -> None:
    r = ExitRouter()
    w = r.watch(11)
    got: list[Exit] = []

    async def waiter() -> None:
        got.append(await w.wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            r.route(ex(11, 4))
    assert got == [ex(11, 4)]


def test_other_pid_not_delivered() -> None:
    r = ExitRouter()
    w = r.watch(1)
    assert r.route(ex(2)) is False
    assert w.exit is None
    assert r.watched == 1


async def test_early_exit_during_hold_delivered_on_watch() -> None:
    r = ExitRouter()
    with r.hold() as hold:
        assert r.route(ex(20, 5)) is False
        w = r.watch(20, hold)
        assert w.exit == ex(20, 5)
        assert r.watched == 0  # already satisfied, not registered
        with trio.fail_after(1):
            assert await w.wait() == ex(20, 5)
        # It was claimed: a second watch does not see it again.
        w2 = r.watch(20, hold)
        assert w2.exit is None


def test_early_exit_without_hold_dropped() -> None:
    r = ExitRouter()
    assert r.route(ex(30, 5)) is False
    w = r.watch(30)
    assert w.exit is None
    assert r.watched == 1


def test_unclaimed_exit_dropped_when_hold_closes() -> None:
    r = ExitRouter()
    with r.hold() as hold:
        r.route(ex(31))
    assert r.held == 0
    assert r.watch(31, hold).exit is None


def test_an_exit_is_claimed_only_through_a_hold_open_when_it_was_reaped() -> None:
    """Each hold keeps what was reaped while it was open, and only for a watch given it: an
    exit reaped before a hold opened is not that hold's (the Go shim's per-start subscribers)."""
    r = ExitRouter()
    with r.hold() as outer:
        r.route(ex(40, 1))
        with r.hold() as inner:
            r.route(ex(41, 2))
        assert r.watch(40, inner).exit is None  # reaped before inner opened
        assert r.watch(41, outer).exit == ex(41, 2)  # reaped while both were open
    assert r.held == 0  # every hold closed: nothing kept


def test_a_stale_exit_is_not_claimed_by_a_later_watch_of_a_reused_pid() -> None:
    """In a shim serving many tasks holds overlap continuously. An orphan reaped with no
    watcher while one long hold is open must not be delivered to a process that a later
    runtime call starts under the same (reused) pid: that process is running."""
    r = ExitRouter()
    with r.hold():  # e.g. a slow runc create of another task
        r.route(ex(42, 137))  # an orphan (a container's grandchild) reaped, nobody watches it
        with r.hold() as later:  # a runc exec whose process gets the pid again
            w = r.watch(42, later)
        assert w.exit is None
        assert r.watched == 1


def test_hold_released_on_exception() -> None:
    r = ExitRouter()
    with pytest.raises(RuntimeError), r.hold() as hold:
        raise RuntimeError("boom")
    r.route(ex(50))
    assert r.held == 0
    assert r.watch(50, hold).exit is None  # no hold left open


def test_double_watch_raises() -> None:
    r = ExitRouter()
    r.watch(60)
    with pytest.raises(ValueError, match="60"):
        r.watch(60)


def test_unwatch() -> None:
    r = ExitRouter()
    w = r.watch(70)
    r.unwatch(w)
    assert r.watched == 0
    assert r.route(ex(70)) is False
    assert w.exit is None
    r.unwatch(w)  # idempotent
    # After unwatch the pid can be watched again.
    w2 = r.watch(70)
    # A stale watch does not remove its successor.
    r.unwatch(w)
    assert r.watched == 1
    assert r.route(ex(70, 8)) is True
    assert w2.exit == ex(70, 8)


# --- Reaper (real child) -----------------------------------------------------


async def test_reaper_collects_real_child_status() -> None:
    reaper = Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            with reaper.hold() as hold:  # the child may exit before we watch its pid
                proc = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
                watch = reaper.watch(proc.pid, hold)
            try:
                exit = await watch.wait()
            finally:
                if watch.exit is not None:
                    # The reaper, not Popen, collected the child.
                    proc.returncode = watch.exit.status
            assert exit.pid == proc.pid
            assert exit.status == 7
            assert exit.timestamp > 0
            nursery.cancel_scope.cancel()


async def test_a_cancelled_runc_call_is_killed_not_left_running(tmp_path) -> None:
    """A runc command cut by a request's deadline (or shutdown) must not go on changing the
    container: its process group is killed and its pid no longer watched."""
    from shim.runc_client.client import Runc
    from shim.runc_client.config import RuncConfig

    runtime = tmp_path / "fake-runc"
    pid_file = tmp_path / "pid"
    runtime.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    runtime.chmod(0o755)
    reaper = Reaper()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            runc = Runc(RuncConfig(binary=str(runtime), root=str(tmp_path / "root")), reaper)
            with trio.move_on_after(60) as scope:
                async with trio.open_nursery() as calls:
                    calls.start_soon(runc.pause, "c1")
                    while not pid_file.exists() or not pid_file.read_text().strip():
                        await trio.sleep(0.01)
                    scope.cancel()
            pid = int(pid_file.read_text())
            while os.path.exists(f"/proc/{pid}"):  # killed, and reaped by the reaper
                await trio.sleep(0.01)
            assert reaper.watched == 0
            nursery.cancel_scope.cancel()


def test_then_calls_back_at_delivery_or_at_once() -> None:
    """exits.monitor_soon starts a process's monitor only when its exit is in (no task waits)."""
    router = ExitRouter()
    calls: list[str] = []
    w = router.watch(10)
    w.then(lambda: calls.append("ten"))
    assert calls == []
    assert router.route(Exit(10, 0, 0.0))
    assert calls == ["ten"] and w.exit is not None
    w.then(lambda: calls.append("again"))  # already delivered: at once
    assert calls == ["ten", "again"]


def test_a_failing_callback_does_not_stop_the_exits_behind_it(caplog) -> None:
    """A callback runs in the reaper's task: its bug is logged, the next exits still route."""
    router = ExitRouter()

    def broken() -> None:
        raise AssertionError("a bug in a callback")

    first, second = router.watch(11), router.watch(12)
    first.then(broken)
    assert router.route(Exit(11, 0, 0.0))
    assert router.route(Exit(12, 3, 0.0))
    assert first.exit is not None and second.exit is not None and second.exit.status == 3
    assert "a bug in a callback" in caplog.text
    first.then(broken)  # already delivered: called at once, logged as well
