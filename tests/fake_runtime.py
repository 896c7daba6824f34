"""An OCI runtime in memory (shim.daemon.runtime.OCIRuntime) for unit tests of the container logic.

Processes are pids above the kernel's pid_max (nothing real is ever signalled by
them); a test ends one with ``exit(pid, status)``, which routes the exit through
the same ExitRouter the container watches. ``gate(command)`` parks the next call
of that command inside the runtime until the test opens it, so a test can put a
second request exactly "while runc start runs" without any sleep.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import trio

from shim.daemon import events as ev
from shim.daemon.container import Container, Context, CreateRequest
from shim.daemon.reaper import Exit, ExitRouter
from shim.runc_client.config import RuncConfig, RuncError, Stdio

FIRST_PID = 10_000_000  # above any pid_max: a fake pid never names a real process


@dataclass
class Gate:
    entered: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)


class FakeRuntime:
    def __init__(self, router: ExitRouter) -> None:
        self.router = router
        self.calls: list[tuple[str, ...]] = []
        self.failures: dict[str, RuncError] = {}
        self.gates: dict[str, Gate] = {}
        self.state = "absent"
        self.init_pid = 0
        self.exec_pids: list[int] = []
        self._next_pid = FIRST_PID

    # -- test controls --------------------------------------------------------

    def gate(self, command: str) -> Gate:
        self.gates[command] = gate = Gate()
        return gate

    def fail(self, command: str, detail: str, status: int = 1) -> None:
        self.failures[command] = RuncError(command, status, detail)

    def exit(self, pid: int, status: int) -> None:
        self.router.route(Exit(pid, status, time.time()))

    def commands(self) -> list[str]:
        return [c[0] for c in self.calls]

    # -- OCIRuntime -------------------------------------------------------------

    async def _call(self, command: str, *args: str) -> None:
        self.calls.append((command, *args))
        gate = self.gates.pop(command, None)
        if gate is not None:
            gate.entered.set()
            await gate.release.wait()
        error = self.failures.pop(command, None)
        if error is not None:
            raise error
        await trio.lowlevel.checkpoint()

    def _new_pid(self, pid_file: str) -> int:
        pid = self._next_pid
        self._next_pid += 1
        with open(pid_file, "w") as f:
            f.write(str(pid))
        return pid

    async def create(self, id: str, bundle: str, pid_file: str, stdio: Stdio, **_: object) -> None:
        await self._call("create", id)
        self.init_pid = self._new_pid(pid_file)
        self.state = "created"

    async def start(self, id: str) -> None:
        await self._call("start", id)
        self.state = "running"

    async def exec(self, id: str, process_spec: str, pid_file: str, stdio: Stdio, **_: object) -> None:
        await self._call("exec", id)
        self.exec_pids.append(self._new_pid(pid_file))

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        await self._call("kill", id, str(signal))

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self._call("delete", id, "--force" if force else "")
        if force and self.state == "created":
            self.exit(self.init_pid, 137)
        self.state = "absent"

    async def pause(self, id: str) -> None:
        await self._call("pause", id)

    async def resume(self, id: str) -> None:
        await self._call("resume", id)

    async def update(self, id: str, resources_json: bytes) -> None:
        await self._call("update", id)

    async def ps(self, id: str) -> list[int]:
        await self._call("ps", id)
        return [self.init_pid, *self.exec_pids]

    async def checkpoint(self, id: str, image_path: str, work_path: str, flags: list[str]) -> None:
        await self._call("checkpoint", id)

    async def restore(self, id: str, bundle: str, image_path: str, work_path: str, pid_file: str,
                      stdio: Stdio, **_: object) -> None:
        await self._call("restore", id)
        self.init_pid = self._new_pid(pid_file)
        self.state = "running"


class Events:
    """A TaskEventSink that keeps (topic, arguments) pairs, topics named as containerd's."""

    def __init__(self) -> None:
        self.published: list[tuple[str, tuple[object, ...]]] = []

    #: TaskEventSink's methods and the topics containerd knows them by
    TOPICS: ClassVar[dict[str, str]] = {
        "created": ev.TASK_CREATE, "started": ev.TASK_START, "exited": ev.TASK_EXIT, "deleted": ev.TASK_DELETE,
        "exec_added": ev.TASK_EXEC_ADDED, "exec_started": ev.TASK_EXEC_STARTED, "paused": ev.TASK_PAUSED,
        "resumed": ev.TASK_RESUMED, "oom": ev.TASK_OOM, "checkpointed": ev.TASK_CHECKPOINTED,
    }

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name not in self.TOPICS:
            raise AttributeError(name)
        topic = self.TOPICS[name]
        return lambda *args: self.published.append((topic, args))

    def topics(self) -> list[str]:
        return [t for t, _ in self.published]


@dataclass
class Harness:
    container: Container
    runtime: FakeRuntime
    events: Events
    router: ExitRouter
    #: What the runtime had been asked while a racing call was parked (tests' race helper).
    calls_while_parked: list[str] = field(default_factory=list)


#: A container with a pid namespace of its own (the common case: no kill-all at init exit).
OWN_PID_NAMESPACE = '{"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}]}}'


def make_container(bundle: str, nursery: trio.Nursery, id: str = "c1", config: str | None = OWN_PID_NAMESPACE,
                   checkpoint: str = "") -> Harness:
    if config is not None:
        with open(os.path.join(bundle, "config.json"), "w") as f:
            f.write(config)
    router = ExitRouter()
    events = Events()
    made: list[FakeRuntime] = []

    def factory(config: RuncConfig, reaper: ExitRouter, /) -> FakeRuntime:
        made.append(FakeRuntime(reaper))
        return made[0]

    ctx = Context("ns", router, events, nursery, runtime=factory)
    container = Container(CreateRequest(id=id, bundle=bundle, checkpoint=checkpoint), ctx)
    return Harness(container, made[0], events, router)
