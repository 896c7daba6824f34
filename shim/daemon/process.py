"""A process's life cycle as an explicit state machine, plus its exit bookkeeping.

Like the Go shim's ``pkg/process`` states: every RPC first asks the state
whether it is allowed, so "kill a deleted process" or "delete a running one"
is refused in one place with one error, instead of by scattered checks.

The init (the task) and an exec are different kinds with a table each::

    init:  created ──start──▶ running ──pause──▶ paused
              │                  │  ◀──resume──    │
              └──────exit────────┴──────exit───────┘──▶ stopped ──delete──▶ deleted
           created ──delete──▶ deleted
           restorable ──start (restore)──▶ running;  restorable ──delete──▶ deleted

    exec:  created ──start──▶ running ──exit──▶ stopped ──delete──▶ deleted
           created ──delete──▶ deleted

An exec is never paused, resumed, updated or checkpointed (those act on the
task), and nothing is exec'd in an exec. A task created from a checkpoint is
``restorable``: its Start is a restore, and until then there is no process to
exec in, update, pause or checkpoint (containerd shows it as created).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from shim.common.errors import FailedPrecondition, InvalidArgument, NotFound

from .reaper import Watch
from .stdio import ProcessIO, StdioPaths


class Kind(enum.Enum):
    INIT = "init"
    EXEC = "exec"


class State(enum.Enum):
    CREATED = "created"
    RESTORABLE = "restorable"  # created from a checkpoint: Start restores it
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class Op(enum.Enum):
    START = "start"
    KILL = "kill"
    DELETE = "delete"
    PAUSE = "pause"
    RESUME = "resume"
    EXEC = "exec"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    EXIT = "exit"


S, O = State, Op  # noqa: E741 - short aliases keep the table readable

#: kind -> op -> {state it is allowed in: state it leads to (None: unchanged)}.
#: An op missing from a kind's table is one that kind never does.
TRANSITIONS: dict[Kind, dict[Op, dict[State, State | None]]] = {
    Kind.INIT: {
        O.START: {S.CREATED: S.RUNNING, S.RESTORABLE: S.RUNNING},
        O.KILL: {S.CREATED: None, S.RESTORABLE: None, S.RUNNING: None, S.PAUSED: None},
        O.DELETE: {S.CREATED: S.DELETED, S.RESTORABLE: S.DELETED, S.STOPPED: S.DELETED},
        O.PAUSE: {S.RUNNING: S.PAUSED},
        O.RESUME: {S.PAUSED: S.RUNNING},
        O.EXEC: {S.CREATED: None, S.RUNNING: None},
        O.UPDATE: {S.CREATED: None, S.RUNNING: None, S.PAUSED: None},
        O.CHECKPOINT: {S.RUNNING: None, S.PAUSED: None},
        O.EXIT: {S.CREATED: S.STOPPED, S.RESTORABLE: S.STOPPED, S.RUNNING: S.STOPPED, S.PAUSED: S.STOPPED},
    },
    Kind.EXEC: {
        O.START: {S.CREATED: S.RUNNING},
        O.KILL: {S.CREATED: None, S.RUNNING: None},  # created: refused by the kill itself (no pid)
        O.DELETE: {S.CREATED: S.DELETED, S.STOPPED: S.DELETED},
        O.EXIT: {S.CREATED: S.STOPPED, S.RUNNING: S.STOPPED},
    },
}


class Lifecycle:
    """The state of one process and the rules for leaving it."""

    def __init__(self, kind: Kind = Kind.INIT, state: State = State.CREATED) -> None:
        self.kind = kind
        self.state = state

    def check(self, op: Op) -> None:
        """Raise the containerd error for ``op`` in the current state, if it is not allowed."""
        allowed = TRANSITIONS[self.kind].get(op)
        if allowed is None:  # never, whatever the state: the request is wrong, not the moment
            raise InvalidArgument(f"cannot {op.value} an {self.kind.value} process (only the task's init)")
        if self.state in allowed:
            return
        if op is Op.KILL and self.state in (State.STOPPED, State.DELETED):
            raise NotFound("process already finished")
        if op is Op.EXEC:
            raise FailedPrecondition(f"cannot exec in a {self.state.value} container")
        raise FailedPrecondition(f"cannot {op.value} a {self.state.value} process")

    def allows(self, op: Op) -> bool:
        return self.state in TRANSITIONS[self.kind].get(op, {})

    def apply(self, op: Op) -> State:
        self.check(op)
        target = TRANSITIONS[self.kind][op][self.state]
        if target is not None:
            self.state = target
        return self.state


@dataclass(frozen=True)
class ExitInfo:
    status: int
    exited_at: float  # seconds since the epoch


class Process:
    """Init or exec process: pid, state, stdio, and the exit others wait for.

    Every operation runs as ``async with process.operation(op):`` around its OCI runtime
    call: the process's lock is held from the state check through the call to the state
    change, so two requests on one process (Start and Delete, Pause and Resume, Kill and
    Delete) never interleave, as the Go shim's per-process mutex guarantees. An exit is
    recorded under the same lock.

    An exit has two moments: ``record_exit`` (from then on the state is STOPPED, so State,
    Kill and Delete see a dead process) and ``set_exit_out`` once its TaskExit is out (after
    the process's output), which is when ``wait`` returns: containerd closes its side of the
    IO when Wait returns. Whether a TaskExit goes out at all is ``publish_exit``, decided by
    ``record_exit`` alone.
    """

    def __init__(self, id: str, exec_id: str = "", stdio: StdioPaths | None = None, spec: bytes = b"",
                 *, restore: bool = False) -> None:
        self.id = id
        self.exec_id = exec_id
        self.stdio = stdio or StdioPaths()
        self.spec = spec  # exec only: the OCI process spec (JSON)
        self.io: ProcessIO | None = None
        self.pid = 0
        kind = Kind.EXEC if exec_id else Kind.INIT
        self.lifecycle = Lifecycle(kind, State.RESTORABLE if restore else State.CREATED)
        self.lock = trio.Lock()
        self.exit: ExitInfo | None = None
        #: Whether this process's exit goes out as a TaskExit. False while it is part of another
        #: operation (a Delete killing a never-started task, an exec whose Start failed): as in Go.
        self.publish_exit = True
        self._exit_out = trio.Event()
        #: The reaper's watch on this process once it runs; its ``exit`` is set at reap time.
        self.watch: Watch | None = None

    @property
    def reaped(self) -> bool:
        """Reaped: gone from the kernel (its pid may be reused), even if its exit is not recorded yet."""
        return self.watch is not None and self.watch.exit is not None

    @property
    def exit_out(self) -> bool:
        """Its exit is out (published, or it never will be): Wait has returned."""
        return self._exit_out.is_set()

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @asynccontextmanager
    async def operation(self, op: Op) -> AsyncIterator[None]:
        """check → (the caller's runtime call) → apply, under the process's lock.

        If the body raises, the state is left as it was.
        """
        async with self.lock:
            self.lifecycle.check(op)
            yield
            self.lifecycle.apply(op)

    def record_exit(self, status: int, exited_at: float) -> bool:
        """Record the exit (hold ``lock``): the state becomes STOPPED (a deleted process stays
        deleted). The one place that decides whether a TaskExit goes out: True for the first
        exit recorded of a process whose ``publish_exit`` holds."""
        if self.exit is not None:
            return False
        self.exit = ExitInfo(status, exited_at)
        if self.lifecycle.allows(Op.EXIT):
            self.lifecycle.apply(Op.EXIT)
        return self.publish_exit

    def set_exit_out(self) -> None:
        """The exit is published (or never will be): wake Wait."""
        assert self.exit is not None
        self._exit_out.set()

    async def wait(self) -> ExitInfo:
        await self._exit_out.wait()
        assert self.exit is not None
        return self.exit
