"""A process's life cycle as an explicit state machine, plus its exit bookkeeping.

Like the Go shim's ``pkg/process`` states: every RPC first asks the state
whether it is allowed, so "kill a deleted process" or "delete a running one"
is refused in one place with one error, instead of by scattered checks.

    created ──start──▶ running ──pause──▶ paused
       │                  │  ◀──resume──    │
       └──────exit────────┴──────exit───────┘──▶ stopped ──delete──▶ deleted
    created ──delete──▶ deleted
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from shim.common.errors import FailedPrecondition, NotFound

from .reaper import Watch
from .stdio import ProcessIO, StdioPaths


class State(enum.Enum):
    CREATED = "created"
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

# op -> {state it is allowed in: state it leads to (None: unchanged)}
TRANSITIONS: dict[Op, dict[State, State | None]] = {
    O.START: {S.CREATED: S.RUNNING},
    O.KILL: {S.CREATED: None, S.RUNNING: None, S.PAUSED: None},
    O.DELETE: {S.CREATED: S.DELETED, S.STOPPED: S.DELETED},
    O.PAUSE: {S.RUNNING: S.PAUSED},
    O.RESUME: {S.PAUSED: S.RUNNING},
    O.EXEC: {S.CREATED: None, S.RUNNING: None},
    O.UPDATE: {S.CREATED: None, S.RUNNING: None, S.PAUSED: None},
    O.CHECKPOINT: {S.RUNNING: None, S.PAUSED: None},
    O.EXIT: {S.CREATED: S.STOPPED, S.RUNNING: S.STOPPED, S.PAUSED: S.STOPPED},
}


class Lifecycle:
    """The state of one process and the rules for leaving it."""

    def __init__(self) -> None:
        self.state = State.CREATED

    def check(self, op: Op) -> None:
        """Raise the containerd error for ``op`` in the current state, if it is not allowed."""
        if self.state in TRANSITIONS[op]:
            return
        if op is Op.KILL and self.state in (State.STOPPED, State.DELETED):
            raise NotFound("process already finished")
        if op is Op.EXEC:
            raise FailedPrecondition(f"cannot exec in a {self.state.value} container")
        raise FailedPrecondition(f"cannot {op.value} a {self.state.value} process")

    def apply(self, op: Op) -> State:
        self.check(op)
        target = TRANSITIONS[op][self.state]
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

    An exit has two moments: ``set_exited`` at reap (the state is STOPPED from then on, so
    State, Kill and Delete see a dead process at once) and ``mark_reported`` once its
    TaskExit is out (after the process's output), which is when ``wait`` returns: containerd
    closes its side of the IO when Wait returns.
    """

    def __init__(self, id: str, exec_id: str = "", stdio: StdioPaths | None = None, spec: bytes = b"") -> None:
        self.id = id
        self.exec_id = exec_id
        self.stdio = stdio or StdioPaths()
        self.spec = spec  # exec only: the OCI process spec (JSON)
        self.io: ProcessIO | None = None
        self.pid = 0
        self.lifecycle = Lifecycle()
        self.lock = trio.Lock()
        self.exit: ExitInfo | None = None
        #: False while a Delete of a never-started process kills it (no TaskExit then).
        self.exit_reported = True
        self._reported = trio.Event()
        #: The reaper's watch on this process once it runs; its ``exit`` is set at reap time.
        self.watch: Watch | None = None

    @property
    def reaped(self) -> bool:
        """Reaped: gone from the kernel (its pid may be reused), even if its exit is not out yet."""
        return self.watch is not None and self.watch.exit is not None

    @property
    def reported(self) -> bool:
        """Its exit is out (or will never be): Wait has returned."""
        return self._reported.is_set()

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

    def set_exited(self, status: int, exited_at: float) -> bool:
        """Record the exit (hold ``lock``); False if there is nothing to report: already
        recorded, or the process was deleted (a never-started process Delete killed)."""
        if self.exit is not None:
            return False
        self.exit = ExitInfo(status, exited_at)
        if self.state is State.DELETED:
            return False
        self.lifecycle.apply(Op.EXIT)
        return True

    def mark_reported(self) -> None:
        """The exit is published (or never will be): wake Wait."""
        assert self.exit is not None
        self._reported.set()

    async def wait(self) -> ExitInfo:
        await self._reported.wait()
        assert self.exit is not None
        return self.exit
