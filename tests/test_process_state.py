"""shim.daemon.process: the Lifecycle state machine and Process exit bookkeeping."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from shim.common.errors import FailedPrecondition, NotFound, ShimError
from shim.daemon.process import TRANSITIONS, ExitInfo, Lifecycle, Op, Process, State

S, O = State, Op  # noqa: E741 - as in shim/daemon/process.py

# Written out from the module docstring's diagram (plus kill/exec/update, which
# leave a live process where it is), independently of TRANSITIONS.
#
#     created ──start──▶ running ──pause──▶ paused
#        │                  │  ◀──resume──    │
#        └──────exit────────┴──────exit───────┘──▶ stopped ──delete──▶ deleted
#     created ──delete──▶ deleted
LIVE = (S.CREATED, S.RUNNING, S.PAUSED)
EXPECTED: dict[tuple[Op, State], State] = {
    (O.START, S.CREATED): S.RUNNING,
    (O.PAUSE, S.RUNNING): S.PAUSED,
    (O.RESUME, S.PAUSED): S.RUNNING,
    (O.DELETE, S.CREATED): S.DELETED,
    (O.DELETE, S.STOPPED): S.DELETED,
    **{(O.EXIT, s): S.STOPPED for s in LIVE},
    **{(op, s): s for op in (O.KILL, O.UPDATE) for s in LIVE},
    **{(O.EXEC, s): s for s in (S.CREATED, S.RUNNING)},
    **{(O.CHECKPOINT, s): s for s in (S.RUNNING, S.PAUSED)},
}

ALL_PAIRS = list(itertools.product(Op, State))
ALLOWED = [p for p in ALL_PAIRS if p in EXPECTED]
REFUSED = [p for p in ALL_PAIRS if p not in EXPECTED]


def ids(pair: tuple[Op, State]) -> str:
    return f"{pair[0].value}-{pair[1].value}"


def in_state(state: State) -> Lifecycle:
    lc = Lifecycle()
    lc.state = state
    return lc


def test_table_matches_diagram() -> None:
    table = {
        (op, s): (target if target is not None else s)
        for op, allowed in TRANSITIONS.items()
        for s, target in allowed.items()
    }
    assert table == EXPECTED
    assert set(TRANSITIONS) == set(Op)


def test_new_lifecycle_is_created() -> None:
    assert Lifecycle().state is S.CREATED


@pytest.mark.parametrize("pair", ALLOWED, ids=ids)
def test_allowed_transition(pair: tuple[Op, State]) -> None:
    op, state = pair
    lc = in_state(state)
    lc.check(op)  # no raise, no change
    assert lc.state is state
    assert lc.apply(op) is EXPECTED[pair]
    assert lc.state is EXPECTED[pair]


@pytest.mark.parametrize("pair", REFUSED, ids=ids)
def test_refused_transition(pair: tuple[Op, State]) -> None:
    op, state = pair
    lc = in_state(state)
    expected = NotFound if (op, state) in ((O.KILL, S.STOPPED), (O.KILL, S.DELETED)) else FailedPrecondition
    for call in (lc.check, lc.apply):
        with pytest.raises(ShimError) as info:
            call(op)
        assert type(info.value) is expected
        assert lc.state is state  # a refused op changes nothing
    if expected is NotFound:
        assert info.value.message == "process already finished"
        assert info.value.code == 5
    else:
        assert info.value.code == 9
        assert op.value in info.value.message
        assert state.value in info.value.message
        assert str(info.value) == info.value.message


def test_full_life() -> None:
    lc = Lifecycle()
    for op, state in [
        (O.START, S.RUNNING),
        (O.PAUSE, S.PAUSED),
        (O.KILL, S.PAUSED),
        (O.RESUME, S.RUNNING),
        (O.EXIT, S.STOPPED),
        (O.DELETE, S.DELETED),
    ]:
        assert lc.apply(op) is state


# --- Process ---------------------------------------------------------------


def test_process_defaults() -> None:
    p = Process("c1", "e1")
    assert (p.id, p.exec_id, p.pid, p.exit) == ("c1", "e1", 0, None)
    assert p.state is S.CREATED


@pytest.mark.parametrize("start", LIVE, ids=lambda s: s.value)
def test_set_exited_records_once(start: State) -> None:
    p = Process("c1")
    p.lifecycle.state = start
    assert p.set_exited(137, 1000.5) is True
    assert p.state is S.STOPPED
    assert p.exit == ExitInfo(137, 1000.5)
    # A second exit (e.g. a duplicate report) is ignored.
    assert p.set_exited(0, 2000.0) is False
    assert p.exit == ExitInfo(137, 1000.5)
    assert p.state is S.STOPPED


async def test_wait_returns_once_the_exit_is_reported_not_at_reap() -> None:
    """The state is STOPPED from the reap on; Wait returns only once the exit is out
    (containerd closes its side of the IO when Wait returns)."""
    p = Process("c1")
    p.lifecycle.apply(O.START)
    results: list[ExitInfo] = []

    async def waiter() -> None:
        results.append(await p.wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            assert p.set_exited(3, 42.0) is True
            assert p.state is S.STOPPED and p.exit == ExitInfo(3, 42.0)
            await trio.testing.wait_all_tasks_blocked()
            assert results == [] and not p.reported
            p.mark_reported()
    assert results == [ExitInfo(3, 42.0), ExitInfo(3, 42.0)]
    # After the exit, wait returns at once.
    with trio.fail_after(1):
        assert await p.wait() == ExitInfo(3, 42.0)


async def test_deleted_process_exit_returns_false_but_wakes_waiters() -> None:
    p = Process("c1")
    p.lifecycle.apply(O.DELETE)  # created -> deleted before it ever ran
    results: list[ExitInfo] = []

    async def waiter() -> None:
        results.append(await p.wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert p.set_exited(1, 7.0) is False
            p.mark_reported()
    assert p.state is S.DELETED
    assert results == [ExitInfo(1, 7.0)]
    assert p.set_exited(2, 8.0) is False
    assert p.exit == ExitInfo(1, 7.0)


async def test_an_operation_holds_the_process_from_check_to_apply() -> None:
    """Pause and Resume sent together: the second is checked only after the first applied."""
    p = Process("c1")
    p.lifecycle.apply(O.START)
    order: list[str] = []
    gate = trio.Event()

    async def pause() -> None:
        async with p.operation(O.PAUSE):
            order.append("pause: runtime call")
            await gate.wait()
        order.append(f"pause: {p.state.value}")

    async def resume() -> None:
        async with p.operation(O.RESUME):
            order.append(f"resume: runtime call in {p.state.value}")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pause)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(resume)
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["pause: runtime call"]  # resume waits, it was not refused
            gate.set()
    assert order == ["pause: runtime call", "pause: paused", "resume: runtime call in paused"]
    assert p.state is S.RUNNING


async def test_a_failed_operation_changes_nothing() -> None:
    p = Process("c1")
    with pytest.raises(RuntimeError):
        async with p.operation(O.START):
            raise RuntimeError("runtime said no")
    assert p.state is S.CREATED
    async with p.operation(O.START):  # the lock was given back
        pass
    assert p.state is S.RUNNING
