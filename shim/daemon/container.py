"""One container: its bundle, rootfs, init and exec processes, and runc.

Each operation runs inside ``process.operation(op)``: under the process's
lock it asks the Lifecycle, calls the OCI runtime (``Context.runtime``, a
protocol: runc in the shim, a fake in unit tests), then changes state and
enqueues the matching event in one synchronous step, so events leave in the
order the state changed and two requests on one process never interleave.

Exits are ``shim.daemon.exits``'s: one module from reap to publish. Events leave
through ``Context.events`` (``shim.daemon.task_events.TaskEventSink``) as plain
values: protobuf stays in the service layer. Checkpoint/restore details are
``shim.daemon.checkpoint``'s.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import trio

from shim.common import lean
from shim.common.bundle import (
    DELETE_RESPONSE_FILE,
    INIT_PID_FILE,
    PRIVATE,
    ROOTFS_DIR,
    RUNC_LOG,
    read_pid_file,
    write_atomic_bytes,
)
from shim.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
)
from shim.common.mount import MountSpec, mount_all, unmount_all
from shim.common.options import RuncOptions
from shim.common.wire import delete_response
from shim.runc_client.client import Runc
from shim.runc_client.config import RuncConfig, RuncError

from . import checkpoint as criu
from . import exits
from .cgroups import ContainerCgroup, container_cgroup
from .checkpoint import CheckpointRequest
from .exits import InFlight, gone
from .fds import write_all_blocking
from .isolation import Isolated
from .oom import OOMWatcher
from .process import ExitInfo, Op, Process, State
from .reaper import ExitRouter, Hold, Watch
from .runtime import OCIRuntime, RuntimeFactory
from .stdio import ProcessIO, StdioPaths
from .task_events import TaskEventSink

log = logging.getLogger("shim.container")

#: How long Delete of a never-started container waits for runc's kill to land.
CREATED_DELETE_WAIT = 2.0
#: Exit status reported for an exec whose process never started.
EXEC_START_FAILED = 255
#: How long cleaning up after a failed or cancelled create may take.
DISCARD_TIMEOUT = 10.0



@dataclass
class CreateRequest:
    id: str
    bundle: str
    rootfs: list[MountSpec] = field(default_factory=list)
    stdio: StdioPaths = field(default_factory=StdioPaths)
    options: RuncOptions = field(default_factory=RuncOptions)
    checkpoint: str = ""  # restore from this criu image at Start
    parent_checkpoint: str = ""


@dataclass
class Context:
    """What every container shares with the shim."""

    namespace: str
    reaper: ExitRouter
    events: TaskEventSink
    nursery: trio.Nursery  # owns process monitors and IO copiers
    thp_original: int = 0
    oom: OOMWatcher | None = None
    runtime: RuntimeFactory = Runc


def _signal_exec(process: Process, signal: int) -> None:
    """kill(2) an exec's pid, never a recycled one: the reaper runs in this trio loop, so a
    pid not reaped yet (checked with no await before the kill) is still our exec or its zombie."""
    if not process.pid:
        raise FailedPrecondition(f"process {process.exec_id} not created")
    if process.reaped:
        raise NotFound("process already finished")
    try:
        os.kill(process.pid, signal)
    except ProcessLookupError:
        raise NotFound("process already finished") from None


def exec_spec(exec_id: str, spec: bytes, terminal: bool) -> bytes:
    """The exec's OCI process spec with the request's terminal flag, which wins.

    containerd's client can ask for a tty only in the request (cio.WithTerminal)
    and send a spec whose "terminal" is false; runc then refuses the console
    socket. The Go shim sets spec.Terminal = request.Terminal; so do we.
    """
    try:
        process = json.loads(spec)
    except ValueError as e:
        raise InvalidArgument(f"exec {exec_id}: process spec is not JSON: {e}") from e
    if not isinstance(process, dict):
        raise InvalidArgument(f"exec {exec_id}: process spec is not a JSON object")
    if bool(process.get("terminal", False)) == terminal:
        return spec
    process["terminal"] = terminal
    return json.dumps(process).encode()


def spec_memfd(spec: bytes) -> int:
    """The exec's process spec in an unnamed memory file, which runc opens as ``/proc/self/fd/N``.

    A file in the bundle cost a create and an unlink on the bundle's filesystem at every exec
    Start: ~0.8 ms measured under load on a journalled disk (/run is not tmpfs everywhere).
    A memfd is one syscall, nothing to remove. Never fd 0-2: those are runc's stdio.
    """
    fd = os.memfd_create("runc-process", os.MFD_CLOEXEC)
    try:
        if fd < 3:
            low, fd = fd, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(low)
        write_all_blocking(fd, spec)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        self.runc: OCIRuntime = ctx.runtime(
            RuncConfig(
                binary=request.options.binary,
                root=request.options.runc_root(ctx.namespace),
                log_path=os.path.join(request.bundle, RUNC_LOG),
                systemd_cgroup=request.options.systemd_cgroup,
                criu=request.options.criu_path,
                thp_original=ctx.thp_original,
            ),
            ctx.reaper,
        )
        self.init = Process(request.id, stdio=request.stdio, restore=bool(request.checkpoint))
        self.execs: dict[str, Process] = {}
        self.cgroup: ContainerCgroup | None = None
        self._mounted = False
        #: exits.shares_pid_namespace of the spec, when read already (with the rootfs mount).
        self.pid_namespace_shared: bool | None = None
        self.execs_starting = InFlight()
        #: Where this container's monitors and copiers run: their failures stay its own.
        self.tasks = Isolated(ctx.nursery, request.id)

    def _new_io(self, stdio: StdioPaths, exec_id: str = "") -> ProcessIO:
        options = self.request.options
        return ProcessIO(
            stdio, id=exec_id or self.id, namespace=self.ctx.namespace, uid=options.io_uid, gid=options.io_gid
        )

    # -- create -----------------------------------------------------------

    async def create(self) -> int:
        req = self.request
        init = self.init
        runtime_called = False
        watch: Watch | None = None
        try:
            await self._mount_rootfs()
            log.debug("%s: rootfs mounted", self.id)
            init.io = self._new_io(req.stdio)
            log.debug("%s: stdio opened", self.id)
            req.options.write(self.bundle, self.ctx.namespace)
            log.debug("%s: options written", self.id)
            if req.checkpoint:
                # Like the Go shim: a restore happens at Start; Create only prepares.
                self._publish_create(0)
                return 0
            pid_file = os.path.join(self.bundle, INIT_PID_FILE)
            log.debug("%s: runc create", self.id)
            runtime_called = True
            with self.ctx.reaper.hold() as hold:
                await self.runc.create(
                    self.id,
                    self.bundle,
                    pid_file,
                    init.io.runc_stdio(),
                    no_pivot=req.options.no_pivot_root,
                    no_new_keyring=req.options.no_new_keyring,
                    console_socket=init.io.console_socket,
                )
                watch = self._watch_pid_file(pid_file, hold)
            log.debug("%s: runc create returned, pid file read", self.id)
            init.io.close_child_ends()
            await init.io.start(self.tasks)
            log.debug("%s: stdio copiers started", self.id)
        except BaseException as e:
            if runtime_called and (watch is not None or not isinstance(e, RuncError)):
                # cancelled in runc create, or failed after it: what it made must not stay
                await self._discard(watch)
            await self._release()
            if isinstance(e, RuncError):
                raise ShimError(f"OCI runtime create failed: {e.detail}") from e
            raise
        init.pid, init.watch = watch.pid, watch
        log.debug("%s: created, init pid %d", self.id, init.pid)
        self._publish_create(init.pid)
        self._track_cgroup(init.pid)
        exits.monitor_soon(self, init, watch)
        return init.pid

    def _track_cgroup(self, pid: int) -> None:
        """Find the task's cgroup once (for Stats) and watch it for OOM kills."""
        try:
            self.cgroup = container_cgroup(pid)
            if self.ctx.oom is not None:
                self.ctx.oom.add(self.id, pid, self._on_oom)
        except (OSError, ValueError) as e:
            log.warning("%s: cgroup of pid %d: %s (no stats/OOM events)", self.id, pid, e)

    @property
    def events(self) -> TaskEventSink:
        return self.ctx.events

    def _on_oom(self, _key: str) -> None:
        self.events.oom(self.id)

    def _publish_create(self, pid: int) -> None:
        """TaskCreate, the last reader of the request's mounts (a checkpoint's Create too):
        they are dropped then (unmounting goes by the rootfs directory); a namespace shim
        keeps thousands of containers (~1 KiB each, overlay's lowerdir lists included)."""
        req = self.request
        self.events.created(self.id, self.bundle, req.rootfs, req.stdio, req.checkpoint, pid)
        req.rootfs = []

    def _watch_pid_file(self, pid_file: str, hold: Hold) -> Watch:
        """Call inside the reaper hold of the runtime call: the process may already have exited."""
        return self.ctx.reaper.watch(read_pid_file(pid_file), hold)

    def _watch_if_started(self, pid_file: str, hold: Hold) -> Watch | None:
        """After a runtime call that failed or was cancelled (inside its reaper hold): the
        process it may have started anyway, per its pid file."""
        try:
            return self._watch_pid_file(pid_file, hold)
        except (OSError, ValueError):
            return None

    async def _discard(self, watch: Watch | None) -> None:
        """``runc delete --force`` of a container whose create did not complete, even when
        cancelled: runc state and a waiting init must not outlive the failed Create."""
        with trio.CancelScope(shield=True), trio.move_on_after(DISCARD_TIMEOUT):
            try:
                await self.runc.delete(self.id, force=True)
            except RuncError as e:
                log.debug("%s: discarding a failed create: %s", self.id, e)
        if watch is not None:
            self.ctx.reaper.unwatch(watch)

    async def _mount_rootfs(self) -> None:
        """Mount in a worker thread: an overlay of many layers, a loop device, a slow disk
        must not stall the other containers' requests (not cancellable: a mount either
        happened or not, and ``_mounted`` must say which). The same thread reads whether
        the spec shares a pid namespace, which the init's exit would otherwise read in a
        thread of its own before it can be published (~0.6 ms)."""
        if not self.request.rootfs:
            return

        def mount() -> None:
            os.makedirs(self.rootfs, 0o711, exist_ok=True)
            mount_all(self.request.rootfs, self.rootfs)
            self.pid_namespace_shared = exits.shares_pid_namespace(self.bundle)

        try:
            await trio.to_thread.run_sync(mount)
        except OSError as e:
            raise ShimError(f"failed to mount rootfs component: {e}") from e
        self._mounted = True

    async def _release(self) -> None:
        """Give back fds and mounts (failed create, or delete), even when cancelled; the
        unmount runs in a worker thread (a busy mount is retried for a while)."""
        for process in (self.init, *self.execs.values()):
            if process.io is not None:
                process.io.close()
        if self._mounted:
            self._mounted = False
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(unmount_all, self.rootfs)
                except OSError as e:
                    log.warning("unmount %s: %s", self.rootfs, e)

    # -- processes ----------------------------------------------------------

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"process {exec_id}: not found") from None

    def add_exec(self, exec_id: str, stdio: StdioPaths, spec: bytes) -> None:
        """Exec RPC: register the process; runc runs it at Start."""
        if not exec_id:
            raise InvalidArgument("exec id is empty")
        if exec_id in self.execs:
            raise AlreadyExists(f"id {exec_id}: already exists")
        self.init.lifecycle.check(Op.EXEC)
        if self.init.reaped and not exits.execs_pending(self):
            # Reaped and its exit not held for other execs: stopped, whatever the state says this instant.
            raise FailedPrecondition("cannot exec in a stopped container")
        self.execs[exec_id] = Process(self.id, exec_id, stdio, exec_spec(exec_id, spec, stdio.terminal))
        self.events.exec_added(self.id, exec_id)

    async def start(self, exec_id: str = "") -> int:
        if exec_id:
            return await self._start_exec(self.process(exec_id))
        async with self.init.operation(Op.START):
            try:
                if self.init.state is State.RESTORABLE:
                    await self._restore()
                else:
                    await self.runc.start(self.id)
            except RuncError as e:
                if self._init_dead():  # killed meanwhile (a Kill of the created task)
                    raise FailedPrecondition("cannot start a stopped process") from e
                raise ShimError(f"OCI runtime start failed: {e.detail}") from e
            # The state changes as the block ends, with no await in between.
            self.events.started(self.id, self.init.pid)
        return self.init.pid

    async def _restore(self) -> None:
        req, init = self.request, self.init
        assert init.io is not None
        work, _ = criu.work_dir(self.bundle, req.options.criu_work_path)
        pid_file = os.path.join(self.bundle, INIT_PID_FILE)
        try:
            with self.ctx.reaper.hold() as hold:
                await self.runc.restore(
                    self.id,
                    self.bundle,
                    req.checkpoint,
                    work,
                    pid_file,
                    init.io.runc_stdio(),
                    parent_path=req.parent_checkpoint,
                    no_pivot=req.options.no_pivot_root,
                    console_socket=init.io.console_socket,
                )
                watch = self._watch_pid_file(pid_file, hold)
        except RuncError as e:
            tail = await trio.to_thread.run_sync(criu.log_tail, work, "restore.log")
            raise ShimError(f"OCI runtime restore failed: {e.detail}{tail}") from e
        init.io.close_child_ends()
        await init.io.start(self.tasks)
        init.pid, init.watch = watch.pid, watch
        self._track_cgroup(init.pid)
        exits.monitor_soon(self, init, watch)

    async def checkpoint(self, request: CheckpointRequest) -> None:
        if not request.path:
            raise InvalidArgument("checkpoint path is empty")
        async with self.init.operation(Op.CHECKPOINT):
            await self._checkpoint(request)

    async def _checkpoint(self, request: CheckpointRequest) -> None:
        work, ours = criu.work_dir(self.bundle, request.work_path)
        try:
            await self.runc.checkpoint(self.id, request.path, work, request.runc_flags())
        except RuncError as e:
            kept = os.path.join(self.bundle, "criu-dump.log")
            tail = await trio.to_thread.run_sync(criu.dump_failure, work, kept)
            raise ShimError(f"checkpoint failed: {e.detail}{tail}") from e
        finally:
            if ours:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(criu.remove_work_dir, work)
        self.events.checkpointed(self.id, request.path)

    def _init_dead(self) -> bool:
        """After a runtime call failed: did it fail because the init is gone or going? Reaped,
        a zombie the reaper has not collected yet, or already inside the kernel's exit (a
        SIGKILLed pid-namespace init waits there for the process runc exec was starting). Its
        pid is still ours until the reaper collects it: no reuse."""
        if self.init.reaped or not self.init.pid:
            return self.init.reaped
        return lean.process_ending(self.init.pid)  # procfs: never blocks

    def _check_init_not_reaped(self) -> None:
        """An exec starts only in a live init. Once the init is reaped (even while its exit is
        held for other execs, State still saying running) an exec could only fail, or, worse,
        exit after the init's exit went out: refused, in Go's words."""
        self.init.lifecycle.check(Op.EXEC)
        if self.init.reaped:
            raise FailedPrecondition(f"container {self.id} init process is not running")

    async def _start_exec(self, process: Process) -> int:
        async with process.operation(Op.START):
            self._check_init_not_reaped()
            with self.execs_starting:  # the init's exit waits until this exec has a pid or failed
                return await self._run_exec(process)

    async def _run_exec(self, process: Process) -> int:
        pid_file = os.path.join(self.bundle, f"{process.exec_id}.pid")
        started: Watch | None = None
        spec_fd = spec_memfd(process.spec)
        try:
            process.io = self._new_io(process.stdio, process.exec_id)
            log.debug("%s: runc exec %s", self.id, process.exec_id)
            with self.ctx.reaper.hold() as hold:
                try:
                    await self.runc.exec(
                        self.id,
                        f"/proc/self/fd/{spec_fd}",
                        pid_file,
                        process.io.runc_stdio(),
                        console_socket=process.io.console_socket,
                        keep_fds=(spec_fd,),
                    )
                except BaseException:
                    started = self._watch_if_started(pid_file, hold)  # cancelled after runc started it
                    raise
                watch = started = self._watch_pid_file(pid_file, hold)
            process.io.close_child_ends()
            await process.io.start(self.tasks)
        except BaseException as e:
            if process.io is not None:
                process.io.close()
            process.publish_exit = False  # Delete takes it; no TaskExit, as the Go shim does
            if started is not None:
                # It runs, but Start failed: kill it, and its real exit releases Wait.
                if started.exit is None:
                    os.kill(started.pid, signal.SIGKILL)
                process.pid, process.watch = started.pid, started
                exits.monitor_soon(self, process, started)
            else:
                # It will never run: release anyone waiting on it (containerd's Wait is pending).
                process.record_exit(EXEC_START_FAILED, time.time())
                process.set_exit_out()
            if isinstance(e, RuncError):
                if self._init_dead():  # the init died while runc exec ran
                    raise FailedPrecondition("cannot exec in a stopped container") from e
                raise ShimError(f"OCI runtime exec failed: {e.detail}") from e
            raise
        finally:
            os.close(spec_fd)
        process.pid, process.watch = watch.pid, watch
        log.debug("%s: exec %s started, pid %d", self.id, process.exec_id, process.pid)
        # The state changes to RUNNING as the caller's operation block ends, with no await in between.
        self.events.exec_started(self.id, process.exec_id, process.pid)
        exits.monitor_soon(self, process, watch)
        return process.pid

    async def kill(self, exec_id: str, signal: int, all: bool = False) -> None:
        process = self.process(exec_id)
        async with process.operation(Op.KILL):
            if exec_id:
                _signal_exec(process, signal)
                return
            try:
                await self.runc.kill(self.id, signal, all=all)
            except RuncError as e:
                if gone(e):
                    raise NotFound("process already finished") from e
                raise

    async def delete(self, exec_id: str = "") -> Process:
        if exec_id:
            return await self._delete_exec(self.process(exec_id))
        init = self.init
        async with init.operation(Op.DELETE):
            was_created = init.state in (State.CREATED, State.RESTORABLE)
            # Deleting a never-started task kills its init: that death is part of
            # the delete, not an exit to report (create → delete, no /tasks/exit).
            init.publish_exit = not was_created
            try:
                await self.runc.delete(self.id, force=was_created)
            except RuncError as e:
                if not gone(e):
                    init.publish_exit = True  # not deleted: its exit is the task's again
                    raise
        if was_created:
            if init.pid:  # a restore that never ran has no process to wait for
                with trio.move_on_after(CREATED_DELETE_WAIT):
                    await init.wait()
        else:
            await init.wait()  # TaskExit goes out before TaskDelete (it follows the output)
        await self._release()
        if self.ctx.oom is not None:
            self.ctx.oom.remove(self.id)
        exit = init.exit
        self._leave_delete_response(init.pid, exit)
        self.events.deleted(self.id, init.pid, exit.status if exit else 0, exit.exited_at if exit else None)
        return init

    def _leave_delete_response(self, pid: int, exit: ExitInfo | None) -> None:
        """The answer to containerd's ``delete`` action, written once nothing is left to clean.

        containerd 1.6 runs ``<shim> delete`` after every shim exit; with this
        file the wrapper script answers with ``cat`` instead of starting an
        interpreter (bin/containerd-shim-runc-v2-py).
        """
        status, exited_ns = (exit.status, int(exit.exited_at * 1e9)) if exit else (0, time.time_ns())
        try:
            write_atomic_bytes(
                os.path.join(self.bundle, DELETE_RESPONSE_FILE), delete_response(pid, status, exited_ns), PRIVATE
            )
        except OSError as e:
            log.warning("%s: cannot leave the delete response: %s", self.id, e)

    async def _delete_exec(self, process: Process) -> Process:
        async with process.operation(Op.DELETE):
            pass
        if process.exit is not None:
            await process.wait()  # its TaskExit is out first
        if process.io is not None:
            process.io.close()
        del self.execs[process.exec_id]
        try:
            os.unlink(os.path.join(self.bundle, f"{process.exec_id}.pid"))
        except FileNotFoundError:
            pass
        return process

    async def pause(self) -> None:
        async with self.init.operation(Op.PAUSE):
            await self.runc.pause(self.id)
            self.events.paused(self.id)

    async def resume(self) -> None:
        async with self.init.operation(Op.RESUME):
            await self.runc.resume(self.id)
            self.events.resumed(self.id)

    async def update(self, resources: bytes) -> None:
        """runc update with the LinuxResources JSON containerd sent."""
        async with self.init.operation(Op.UPDATE):
            await self.runc.update(self.id, resources)

    def close_io(self, exec_id: str) -> None:
        process = self.process(exec_id)
        if process.io is not None:
            process.io.close_stdin()

    def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        process = self.process(exec_id)
        if process.io is not None:  # not started yet: nothing to resize (the Go shim agrees)
            process.io.resize(width, height)

    async def pids(self) -> list[tuple[int, str]]:
        """(pid, exec id or "") for every process in the container."""
        try:
            pids = await self.runc.ps(self.id)
        except RuncError as e:
            if gone(e):
                return []
            raise
        exec_ids = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return [(pid, exec_ids.get(pid, "")) for pid in pids]
