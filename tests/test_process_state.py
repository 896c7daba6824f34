"""shim.daemon.process: the Lifecycle state machine and Process exit bookkeeping."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from shim.common.errors import FailedPrecondition, InvalidArgument, NotFound, ShimError
from shim.daemon.process import TRANSITIONS, ExitInfo, Kind, Lifecycle, Op, Process, State

S, O = State, Op  # noqa: E741 - as in shim/daemon/process.py

# Written out from the module docstring's diagrams (plus kill/exec/update, which leave a
# live task where it is), independently of TRANSITIONS.
#
#     init:  created ──start──▶ running ──pause──▶ paused
#               │                  │  ◀──resume──    │
#               └──────exit────────┴──────exit───────┘──▶ stopped ──delete──▶ deleted
#            created ──delete──▶ deleted
#            restorable ──start (restore)──▶ running;  restorable ──delete──▶ deleted
#
#     exec:  created ──start──▶ running ──exit──▶ stopped ──delete──▶ deleted
#            created ──delete──▶ deleted
LIVE = (S.CREATED, S.RUNNING, S.PAUSED)
EXPECTED: dict[tuple[Kind, Op, State], State] = {
    (Kind.INIT, O.START, S.CREATED): S.RUNNING,
    (Kind.INIT, O.START, S.RESTORABLE): S.RUNNING,
    (Kind.INIT, O.PAUSE, S.RUNNING): S.PAUSED,
    (Kind.INIT, O.RESUME, S.PAUSED): S.RUNNING,
    (Kind.INIT, O.DELETE, S.CREATED): S.DELETED,
    (Kind.INIT, O.DELETE, S.RESTORABLE): S.DELETED,
    (Kind.INIT, O.DELETE, S.STOPPED): S.DELETED,
    **{(Kind.INIT, O.EXIT, s): S.STOPPED for s in (*LIVE, S.RESTORABLE)},
    **{(Kind.INIT, O.KILL, s): s for s in (*LIVE, S.RESTORABLE)},
    **{(Kind.INIT, O.UPDATE, s): s for s in LIVE},
    **{(Kind.INIT, O.EXEC, s): s for s in (S.CREATED, S.RUNNING)},
    **{(Kind.INIT, O.CHECKPOINT, s): s for s in (S.RUNNING, S.PAUSED)},
    (Kind.EXEC, O.START, S.CREATED): S.RUNNING,
    **{(Kind.EXEC, O.KILL, s): s for s in (S.CREATED, S.RUNNING)},
    (Kind.EXEC, O.DELETE, S.CREATED): S.DELETED,
    (Kind.EXEC, O.DELETE, S.STOPPED): S.DELETED,
    **{(Kind.EXEC, O.EXIT, s): S.STOPPED for s in (S.CREATED, S.RUNNING)},
}
#: What an exec never does, whatever its state: these act on the task.
EXEC_NEVER = (O.PAUSE, O.RESUME, O.UPDATE, O.CHECKPOINT, O.EXEC)

ALL = list(itertools.product(Kind, Op, State))
ALLOWED = [t for t in ALL if t in EXPECTED]
REFUSED = [t for t in ALL if t not in EXPECTED]


def ids(case: tuple[Kind, Op, State]) -> str:
    return f"{case[0].value}-{case[1].value}-{case[2].value}"


def in_state(kind: Kind, state: State) -> Lifecycle:
    return Lifecycle(kind, state)


def test_tables_match_the_diagrams() -> None:
    table = {
        (kind, op, s): (target if target is not None else s)
        for kind, ops in TRANSITIONS.items()
        for op, allowed in ops.items()
        for s, target in allowed.items()
    }
    assert table == EXPECTED
    assert set(TRANSITIONS[Kind.INIT]) == set(Op)
    assert set(Op) - set(TRANSITIONS[Kind.EXEC]) == set(EXEC_NEVER)


def test_new_lifecycle_is_created() -> None:
    assert Lifecycle().state is S.CREATED
    assert Process("c1").state is S.CREATED
    assert Process("c1", restore=True).state is S.RESTORABLE
    assert Process("c1", "e1").lifecycle.kind is Kind.EXEC


@pytest.mark.parametrize("case", ALLOWED, ids=ids)
def test_allowed_transition(case: tuple[Kind, Op, State]) -> None:
    kind, op, state = case
    lc = in_state(kind, state)
    lc.check(op)  # no raise, no change
    assert lc.allows(op)
    assert lc.state is state
    assert lc.apply(op) is EXPECTED[case]
    assert lc.state is EXPECTED[case]


@pytest.mark.parametrize("case", REFUSED, ids=ids)
def test_refused_transition(case: tuple[Kind, Op, State]) -> None:
    kind, op, state = case
    lc = in_state(kind, state)
    assert not lc.allows(op)
    if kind is Kind.EXEC and op in EXEC_NEVER:
        expected: type[ShimError] = InvalidArgument
    elif op is O.KILL and state in (S.STOPPED, S.DELETED):
        expected = NotFound
    else:
        expected = FailedPrecondition
    for call in (lc.check, lc.apply):
        with pytest.raises(ShimError) as info:
            call(op)
        assert type(info.value) is expected
        assert lc.state is state  # a refused op changes nothing
    if expected is NotFound:
        assert info.value.message == "process already finished"
        assert info.value.code == 5
    elif expected is InvalidArgument:
        assert info.value.code == 3
        assert info.value.message == f"cannot {op.value} an exec process (only the task's init)"
    else:
        assert info.value.code == 9
        assert op.value in info.value.message
        assert state.value in info.value.message
        assert str(info.value) == info.value.message


@pytest.mark.parametrize("op", EXEC_NEVER, ids=lambda o: o.value)
def test_an_exec_is_never_paused_updated_or_checkpointed(op: Op) -> None:
    """Before: one table for both kinds, so a running exec passed the check for pause,
    update, checkpoint (and exec); only the RPCs' shape kept them away."""
    p = Process("c1", "e1")
    p.lifecycle.apply(O.START)
    with pytest.raises(InvalidArgument, match=f"cannot {op.value} an exec process"):
        p.lifecycle.check(op)


def test_full_life() -> None:
    lc = Lifecycle(Kind.INIT)
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
def test_record_exit_records_once(start: State) -> None:
    p = Process("c1")
    p.lifecycle.state = start
    assert p.record_exit(137, 1000.5) is True
    assert p.state is S.STOPPED
    assert p.exit == ExitInfo(137, 1000.5)
    # A second exit (e.g. a duplicate report) is ignored.
    assert p.record_exit(0, 2000.0) is False
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
            assert p.record_exit(3, 42.0) is True
            assert p.state is S.STOPPED and p.exit == ExitInfo(3, 42.0)
            await trio.testing.wait_all_tasks_blocked()
            assert results == [] and not p.exit_out
            p.set_exit_out()
    assert results == [ExitInfo(3, 42.0), ExitInfo(3, 42.0)]
    # After the exit, wait returns at once.
    with trio.fail_after(1):
        assert await p.wait() == ExitInfo(3, 42.0)


async def test_an_exit_that_is_part_of_a_delete_is_not_published_but_wakes_waiters() -> None:
    p = Process("c1")
    p.publish_exit = False  # what Delete of a never-started task decides before killing it
    p.lifecycle.apply(O.DELETE)  # created -> deleted before it ever ran
    results: list[ExitInfo] = []

    async def waiter() -> None:
        results.append(await p.wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert p.record_exit(1, 7.0) is False
            p.set_exit_out()
    assert p.state is S.DELETED  # a deleted process stays deleted
    assert results == [ExitInfo(1, 7.0)]
    assert p.record_exit(2, 8.0) is False
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


def test_every_state_has_a_task_status() -> None:
    """State answers with one of containerd's statuses for every state (restorable: created)."""
    from shim.daemon.service import _STATUS
    from shim.proto import task_types_pb2

    assert set(_STATUS) == set(State)
    assert _STATUS[S.RESTORABLE] == task_types_pb2.CREATED
