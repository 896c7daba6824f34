"""The reaper: the one place that collects child exit statuses.

The shim is a child subreaper, so container inits (orphaned when runc exits)
become its children. If anything besides the reaper called waitpid, an exit
could be stolen (ECHILD for runc calls, a lost TaskExit for containers). So
every exit is collected here by ``waitpid(-1, WNOHANG)`` on SIGCHLD and handed
to exactly one watcher.

The bookkeeping is kept separate from the signal loop (``ExitRouter`` is pure
and unit-tested): an exit may arrive before anyone knows its pid (a process
that dies while ``runc create``/``runc exec`` is still running). Each ``hold``
(one per such runtime call) keeps the unclaimed exits reaped while it is open,
and only a ``watch`` given that hold can claim them; they go when the hold
closes. As the Go shim's per-start exit subscribers: in a shim serving many
tasks holds overlap all the time, and one map shared by every hold would grow
and let a later watch of a reused pid claim a stale exit (a running container
reported exited).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from .fds import call_guarded

log = logging.getLogger("shim.reaper")


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int  # containerd's convention: exit code, or 128 + signal
    timestamp: float  # time.time() when reaped


def exit_status(wait_status: int) -> int:
    """Convert a raw wait status to containerd's exit status (128+signal when killed)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


class Watch:
    """Interest in one pid's exit; ``wait`` returns it once delivered, ``then`` calls back."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exit: Exit | None = None
        self._event = trio.Event()
        self._then: Callable[[], None] | None = None

    def deliver(self, exit: Exit) -> None:
        self.exit = exit
        self._event.set()
        then, self._then = self._then, None
        if then is not None:
            call_guarded(then)

    def then(self, callback: Callable[[], None]) -> None:
        """``callback()`` once the exit is delivered (now if it is already): no task has to
        wait for it meanwhile. Called from the reaper's task: it must not raise or block."""
        if self.exit is not None:
            call_guarded(callback)
        else:
            self._then = callback

    async def wait(self) -> Exit:
        await self._event.wait()
        assert self.exit is not None
        return self.exit


class Hold:
    """The unclaimed exits reaped while one runtime call that starts a process ran."""

    def __init__(self) -> None:
        self.exits: dict[int, Exit] = {}


class ExitRouter:
    """Matches reaped exits to watches; pure bookkeeping, no syscalls."""

    def __init__(self) -> None:
        self._watches: dict[int, Watch] = {}
        self._holds: list[Hold] = []

    def watch(self, pid: int, hold: Hold | None = None) -> Watch:
        """Watch ``pid``; with the ``hold`` open around the call that started it, an exit
        reaped since the hold opened is delivered at once."""
        if pid in self._watches:
            raise ValueError(f"pid {pid} is already watched")
        w = Watch(pid)
        early = hold.exits.pop(pid, None) if hold is not None else None
        if early is not None:
            w.deliver(early)
        else:
            self._watches[pid] = w
        return w

    def unwatch(self, watch: Watch) -> None:
        if self._watches.get(watch.pid) is watch:
            del self._watches[watch.pid]

    def route(self, exit: Exit) -> bool:
        """Deliver an exit; True if a watcher took it."""
        w = self._watches.pop(exit.pid, None)
        if w is not None:
            w.deliver(exit)
            return True
        for hold in self._holds:
            hold.exits[exit.pid] = exit
        return False

    @contextmanager
    def hold(self) -> Iterator[Hold]:
        """Keep unclaimed exits while a pid we will want to watch is not known yet."""
        hold = Hold()
        self._holds.append(hold)
        try:
            yield hold
        finally:
            self._holds.remove(hold)
            hold.exits.clear()  # nobody can claim them any more

    @property
    def held(self) -> int:
        """Unclaimed exits kept by the open holds (each counted once per hold)."""
        return sum(len(hold.exits) for hold in self._holds)

    @property
    def watched(self) -> int:
        return len(self._watches)


class Reaper(ExitRouter):
    """ExitRouter fed by SIGCHLD + waitpid(-1). ``run`` must be started before any child."""

    def reap(self) -> None:
        """Collect every exited child now."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exit = Exit(pid, exit_status(status), time.time())
            if not self.route(exit):
                log.debug("reaped pid %d (status %d) with no watcher yet", pid, exit.status)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.reap()  # anything that exited before the handler was installed
            task_status.started()
            async for _ in signals:
                self.reap()
