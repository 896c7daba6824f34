"""Exits, from reap to publish: the one module that decides when an exit is known and when it goes out.

The reaper (``shim.reaper``) collects every child and hands the exit to the
process's watch; ``monitor`` takes it from there, once per started process:

1. hold (init only): if execs are running or still inside ``runc exec``
   (``InFlight``) when the init is reaped, what is left of a shared pid
   namespace is killed and the init's exit waits until every exec's exit is
   out, since containerd relies on a task's exec exits preceding its init's.
   Meanwhile the task is still running, as in Go (its init state changes only
   when its exit is handled): State says running and an exec may be created,
   but none may start once the init is reaped. With no exec pending, nothing
   is held: the exit is recorded at once, and leftovers killed after that;
2. record: under the process's lock (after an operation in flight, so a Start
   has published TaskStart), the exit is set and the state is STOPPED: State,
   Kill, Exec and Delete see a dead process from now on;
3. drain: the process's output is copied out (bounded: output nobody reads
   must not hold the exit), and a pending OOM event goes first;
4. publish: TaskExit, unless ``Process.record_exit`` says the exit is part of
   another operation (a Delete of a never-started task, a failed exec Start),
   then Wait returns (containerd closes its IO then).

Whatever fails in 1 and 3 is logged and counted, and the exit is still published.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import trio

from shim.common.bundle import CONFIG_FILE
from shim.runc_client.config import RuncError

from .process import Process
from .reaper import Watch

if TYPE_CHECKING:
    from .container import Container

log = logging.getLogger("shim.exits")

#: How long an exit may wait for the process's output to be copied out.
#: Output nobody reads (a detached client) must not hold the exit forever.
OUTPUT_DRAIN_TIMEOUT = 3.0
#: How long an init's exit waits for its execs' exits to be reported first.
EXEC_EXIT_WAIT = 10.0


class InFlight:
    """Counts operations in progress; ``idle()`` returns once none is.

    An exec inside ``runc exec`` has no pid yet, so it is not among the
    running execs an init's exit waits for; counting it here lets the init's
    exit wait until it has either started (its exit then goes first) or
    failed, as the Go shim's ``pendingExecs`` does.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1

    def __exit__(self, *_: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        while self.count:
            await self._idle.wait()


def shares_pid_namespace(bundle: str) -> bool:
    """True unless the spec gives the container a pid namespace of its own.

    Then the kernel does not kill the container's other processes when init
    dies, so the shim must (as the Go shim does). A spec that cannot be read
    counts as shared, as in Go: killing what is left is the safe side.
    Blocking (a file read): called from a worker thread.
    """
    try:
        with open(os.path.join(bundle, CONFIG_FILE)) as f:
            namespaces = json.load(f).get("linux", {}).get("namespaces", [])
        return not any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
    except (OSError, ValueError, AttributeError, TypeError):
        return True


def gone(error: RuncError) -> bool:
    """The OCI runtime's way of saying the process or container no longer exists."""
    return any(text in error.detail.lower() for text in _GONE)


_GONE = ("not running", "no such process", "process already finished", "does not exist", "not exist")


def execs_pending(container: Container) -> bool:
    """Execs the init's exit must wait for: inside ``runc exec``, or started and not out yet."""
    return bool(container.execs_starting.count) or any(p.pid and not p.exit_out for p in container.execs.values())


def monitor_soon(container: Container, process: Process, watch: Watch) -> None:
    """Run ``monitor`` in the container's tasks once the exit is reaped, not before: a task
    waiting for every running process costs ~2 KiB each (a namespace shim runs thousands)."""

    def start() -> None:
        try:
            container.tasks.start_soon(monitor, container, process, watch)
        except RuntimeError:  # the shim is shutting down: its tasks' nursery is closed
            log.debug("%s: exit of pid %d reaped during shutdown", container.id, watch.pid)

    watch.then(start)


async def monitor(container: Container, process: Process, watch: Watch) -> None:
    """Steps 1-4 above for one started process of ``container``."""
    exit = await watch.wait()
    init = process is container.init
    # Decided at reap: no exec starts once the init is reaped, so none can join the wait later.
    held = init and execs_pending(container)
    if held:
        await _guarded(container, process, _after_the_execs(container))
    async with process.lock:
        publish = process.record_exit(exit.status, exit.timestamp)
    if init and not held:
        await _guarded(container, process, _kill_leftovers(container))
    await _guarded(container, process, _drain(container, process))
    if publish:
        container.events.exited(container.id, process.exec_id or container.id, process.pid, exit.status,
                                exit.timestamp)
    process.set_exit_out()


async def _guarded(container: Container, process: Process, step: Awaitable[None]) -> None:
    """A step before publishing: whatever fails in it, the exit is still published."""
    try:
        await step
    except Exception:
        container.tasks.faults += 1
        log.exception("%s: before publishing the exit of %s", container.id, process.exec_id or "init")


async def _after_the_execs(container: Container) -> None:
    """Kill what is left, then let every exec's exit go out before the init's (containerd relies on it)."""
    await _kill_leftovers(container)
    with trio.move_on_after(EXEC_EXIT_WAIT):
        await container.execs_starting.idle()
        for process in [p for p in container.execs.values() if p.pid and not p.exit_out]:
            await process.wait()
        return
    log.warning("%s: execs still running %.0fs after init exit", container.id, EXEC_EXIT_WAIT)


async def _kill_leftovers(container: Container) -> None:
    """A shared pid namespace outlives its init: kill what is left in it, as Go does."""
    shared = container.pid_namespace_shared
    if shared is None:
        shared = await trio.to_thread.run_sync(shares_pid_namespace, container.bundle)
    if shared:
        try:
            await container.runc.kill(container.id, signal.SIGKILL, all=True)
        except RuncError as e:
            if not gone(e):
                log.warning("%s: killing leftovers after init exit: %s", container.id, e)


async def _drain(container: Container, process: Process) -> None:
    io = process.io
    if io is not None and not await io.wait_output(OUTPUT_DRAIN_TIMEOUT):
        log.info("%s: %s output not taken by anyone: exit published without it", container.id,
                 process.exec_id or "init")
    if container.ctx.oom is not None:
        container.ctx.oom.check_now(container.id)  # /tasks/oom before the exit it caused
