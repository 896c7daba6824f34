"""One container: its bundle, rootfs, init process, and runc.

Each operation asks the init's Lifecycle first, then talks to runc, then
changes state and enqueues the matching event in the same synchronous step,
so events leave in the order the state changed.

Exit path of a process (``_monitor``): reaper delivers the exit → wait until
a concurrent Start has published TaskStart → wait (bounded) until its output
is copied out → state STOPPED + TaskExit enqueued → Wait callers wake.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import trio
from google.protobuf.message import Message

from . import events as ev
from .bundle import INIT_PID_FILE, ROOTFS_DIR, RUNC_LOG, read_pid_file
from .errors import InvalidArgument, NotFound, ShimError
from .mount import MountSpec, mount_all, unmount_all
from .options import RuncOptions
from .process import Op, Process, State
from .proto import events_pb2, mount_pb2
from .reaper import ExitRouter, Watch
from .runc_client.client import Runc
from .runc_client.config import RuncConfig, RuncError
from .stdio import ProcessIO, StdioPaths

log = logging.getLogger("shim.container")

#: How long an exit may wait for the process's output to be copied out.
#: Output nobody reads (a detached client) must not hold the exit forever.
OUTPUT_DRAIN_TIMEOUT = 3.0
#: How long Delete of a never-started container waits for runc's kill to land.
CREATED_DELETE_WAIT = 2.0

_GONE = ("not running", "no such process", "process already finished", "does not exist", "not exist")


class Publisher(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


@dataclass
class CreateRequest:
    id: str
    bundle: str
    rootfs: list[MountSpec] = field(default_factory=list)
    stdio: StdioPaths = field(default_factory=StdioPaths)
    options: RuncOptions = field(default_factory=RuncOptions)


@dataclass
class Context:
    """What every container shares with the shim."""

    namespace: str
    reaper: ExitRouter
    events: Publisher
    nursery: trio.Nursery  # owns process monitors and IO copiers
    thp_original: int = 0


def _gone(error: RuncError) -> bool:
    return any(text in error.detail.lower() for text in _GONE)


class Container:
    def __init__(self, request: CreateRequest, ctx: Context) -> None:
        if not request.id:
            raise InvalidArgument("container id is empty")
        if not os.path.isdir(request.bundle):
            raise InvalidArgument(f"bundle {request.bundle!r} is not a directory")
        self.id = request.id
        self.bundle = request.bundle
        self.request = request
        self.ctx = ctx
        self.rootfs = os.path.join(request.bundle, ROOTFS_DIR)
        self.runc = Runc(
            RuncConfig(
                binary=request.options.binary,
                root=request.options.runc_root(ctx.namespace),
                log_path=os.path.join(request.bundle, RUNC_LOG),
                systemd_cgroup=request.options.systemd_cgroup,
                thp_original=ctx.thp_original,
            ),
            ctx.reaper,
        )
        self.init = Process(request.id)
        self.io: ProcessIO | None = None
        self._mounted = False
        self._start_done = trio.Event()
        self._start_done.set()

    # -- create -----------------------------------------------------------

    async def create(self) -> int:
        req = self.request
        try:
            self._mount_rootfs()
            self.io = ProcessIO(req.stdio)
            req.options.write(self.bundle)
            pid_file = os.path.join(self.bundle, INIT_PID_FILE)
            with self.ctx.reaper.hold():
                await self.runc.create(
                    self.id,
                    self.bundle,
                    pid_file,
                    self.io.runc_stdio(),
                    no_pivot=req.options.no_pivot_root,
                    no_new_keyring=req.options.no_new_keyring,
                )
                pid = read_pid_file(pid_file)
                watch = self.ctx.reaper.watch(pid)
        except BaseException as e:
            self._release()
            if isinstance(e, RuncError):
                raise ShimError(f"OCI runtime create failed: {e.detail}") from e
            raise
        self.init.pid = pid
        self.io.close_child_ends()
        self.io.start(self.ctx.nursery)
        self.ctx.events.publish(
            ev.TASK_CREATE,
            events_pb2.TaskCreate(
                container_id=self.id,
                bundle=self.bundle,
                rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in req.rootfs],
                io=events_pb2.TaskIO(
                    stdin=req.stdio.stdin, stdout=req.stdio.stdout, stderr=req.stdio.stderr, terminal=req.stdio.terminal
                ),
                pid=pid,
            ),
        )
        self.ctx.nursery.start_soon(self._monitor, self.init, watch, self.io)
        return pid

    def _mount_rootfs(self) -> None:
        if not self.request.rootfs:
            return
        os.makedirs(self.rootfs, 0o711, exist_ok=True)
        try:
            mount_all(self.request.rootfs, self.rootfs)
        except OSError as e:
            raise ShimError(f"failed to mount rootfs component: {e}") from e
        self._mounted = True

    def _release(self) -> None:
        """Give back fds and mounts (failed create, or delete)."""
        if self.io is not None:
            self.io.close()
        if self._mounted:
            try:
                unmount_all(self.rootfs)
            except OSError as e:
                log.warning("unmount %s: %s", self.rootfs, e)
            self._mounted = False

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> int:
        self.init.lifecycle.check(Op.START)
        self._start_done = trio.Event()
        try:
            await self.runc.start(self.id)
            self.init.lifecycle.apply(Op.START)
            self.ctx.events.publish(ev.TASK_START, events_pb2.TaskStart(container_id=self.id, pid=self.init.pid))
        except RuncError as e:
            raise ShimError(f"OCI runtime start failed: {e.detail}") from e
        finally:
            self._start_done.set()
        return self.init.pid

    async def kill(self, signal: int, all: bool = False) -> None:
        self.init.lifecycle.check(Op.KILL)
        try:
            await self.runc.kill(self.id, signal, all=all)
        except RuncError as e:
            if _gone(e):
                raise NotFound("process already finished") from e
            raise

    async def delete(self) -> Process:
        init = self.init
        init.lifecycle.check(Op.DELETE)
        was_created = init.state is State.CREATED
        # Deleting a never-started task kills its init: that death is part of
        # the delete, not an exit to report (create → delete, no /tasks/exit).
        init.exit_reported = not was_created
        try:
            await self.runc.delete(self.id, force=was_created)
        except RuncError as e:
            init.exit_reported = True
            if not _gone(e):
                raise
        init.lifecycle.apply(Op.DELETE)
        if was_created:
            with trio.move_on_after(CREATED_DELETE_WAIT):
                await init.wait()
        self._release()
        exit = init.exit
        self.ctx.events.publish(
            ev.TASK_DELETE,
            events_pb2.TaskDelete(
                container_id=self.id,
                pid=init.pid,
                exit_status=exit.status if exit else 0,
                exited_at=ev.timestamp(exit.exited_at) if exit else None,
            ),
        )
        return init

    async def pids(self) -> list[int]:
        try:
            return await self.runc.ps(self.id)
        except RuncError as e:
            if _gone(e):
                return []
            raise

    def process(self, exec_id: str) -> Process:
        if exec_id:
            raise NotFound(f"process {exec_id} does not exist")
        return self.init

    # -- exits --------------------------------------------------------------

    async def _monitor(self, process: Process, watch: Watch, io: ProcessIO | None) -> None:
        exit = await watch.wait()
        await self._start_done.wait()
        if io is not None and not await io.wait_output(OUTPUT_DRAIN_TIMEOUT):
            log.warning("%s: output still pending %.0fs after exit", self.id, OUTPUT_DRAIN_TIMEOUT)
        if process.set_exited(exit.status, exit.timestamp) and process.exit_reported:
            self.ctx.events.publish(
                ev.TASK_EXIT,
                events_pb2.TaskExit(
                    container_id=self.id,
                    id=process.exec_id or self.id,
                    pid=process.pid,
                    exit_status=exit.status,
                    exited_at=ev.timestamp(exit.timestamp),
                ),
            )
