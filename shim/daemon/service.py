"""The task service: ttrpc methods of ``containerd.task.v2.Task`` mapped onto containers.

Thin on purpose: decode the request, find the container, call the domain,
encode the reply. Domain errors carry their containerd code and become ttrpc
statuses here.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from collections.abc import Awaitable, Callable

import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError, Message

from shim.common import nofile
from shim.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, ShimError
from shim.common.mount import MountSpec
from shim.common.options import RuncOptions, from_toml, runtime_options_toml
from shim.common.record import field_names
from shim.common.wire import RUNC_OPTIONS_TYPE, RUNTIME_OPTIONS_TYPE, type_name
from shim.proto import runc_options_pb2, shim_pb2, task_types_pb2
from shim.ttrpc import CallContext, Code, Server, TTRPCError

from . import events as ev
from .checkpoint import CheckpointRequest
from .container import Container, Context, CreateRequest
from .exits import InFlight
from .netstats import network_stats
from .process import ExitInfo, Process, State
from .stdio import StdioPaths

log = logging.getLogger("shim.service")

SERVICE_V2 = "containerd.task.v2.Task"
SERVICE_V3 = "containerd.task.v3.Task"
PROCESS_DETAILS_TYPE = "containerd.runc.v1.ProcessDetails"
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"

#: What a State reply is computed from, beside the process itself: pid, state, exit.
_StateKey = tuple[int, State, ExitInfo | None]

_STATUS = {
    State.CREATED: task_types_pb2.CREATED,
    State.RESTORABLE: task_types_pb2.CREATED,  # as Go shows a task created from a checkpoint
    State.RUNNING: task_types_pb2.RUNNING,
    State.PAUSED: task_types_pb2.PAUSED,
    State.STOPPED: task_types_pb2.STOPPED,
    State.DELETED: task_types_pb2.STOPPED,
}


#: containerd's identifier rule (pkg/identifiers): what its API accepts as a task or exec id.
_ID = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
MAX_ID_LENGTH = 76


def check_id(kind: str, value: str) -> None:
    """Ids name files in the bundle (``<exec-id>.pid``): "/x" or "../x" must never reach a path."""
    if len(value) > MAX_ID_LENGTH or not _ID.fullmatch(value):
        raise InvalidArgument(f"{kind} {value[:MAX_ID_LENGTH]!r}: must match {_ID.pattern} (at most {MAX_ID_LENGTH} characters)")


def options_from_any(type_url: str, value: bytes) -> RuncOptions:
    """Decode CreateTaskRequest.options; empty or unknown types → defaults.

    CRI sends ``runtimeoptions.v1.Options`` (a TOML file path or body) for
    runtime types it does not know, ours included; its TOML uses the Go field
    names of runc's Options (BinaryName, SystemdCgroup, ...).
    """
    name = type_name(type_url) if type_url else ""
    if name == RUNC_OPTIONS_TYPE:
        try:
            msg = runc_options_pb2.Options.FromString(value)
        except DecodeError as e:
            raise InvalidArgument(f"runtime options {RUNC_OPTIONS_TYPE}: {e}") from e
        typed = set(msg.DESCRIPTOR.fields_by_name)
        return RuncOptions(**{name: getattr(msg, name) for name in field_names(RuncOptions) if name in typed})
    if name == RUNTIME_OPTIONS_TYPE:
        return from_toml(runtime_options_toml(value))
    return RuncOptions()


class TaskService:
    def __init__(self, ctx: Context, *, version: str = "") -> None:
        self.ctx = ctx
        self.version = version
        self.containers: dict[str, Container] = {}
        self.shutdown_requested = trio.Event()
        #: Shutdown{now: true}: in-flight calls get no grace.
        self.shutdown_now = False
        #: Creates and exec Starts in progress: the fds they are about to take count as taken.
        self._adding = InFlight()
        #: State's last reply per process, serialized, with what it was computed from.
        self._state_replies: weakref.WeakKeyDictionary[Process, tuple[_StateKey, bytes]] = (
            weakref.WeakKeyDictionary())

    def register(self, server: Server) -> None:
        """Serve containerd.task.v2.Task and its byte-identical v3 twin (containerd 2.x)."""
        for service in (SERVICE_V2, SERVICE_V3):
            self._register(server, service)

    def _register(self, server: Server, service: str) -> None:
        S = shim_pb2
        methods: list[tuple[str, type[Message], Callable[..., Awaitable[Message]]]] = [
            ("Create", S.CreateTaskRequest, self.create),
            ("Start", S.StartRequest, self.start),
            ("Wait", S.WaitRequest, self.wait),
            ("Kill", S.KillRequest, self.kill),
            ("Pids", S.PidsRequest, self.pids),
            ("Delete", S.DeleteRequest, self.delete),
            ("Exec", S.ExecProcessRequest, self.exec),
            ("CloseIO", S.CloseIORequest, self.close_io),
            ("ResizePty", S.ResizePtyRequest, self.resize_pty),
            ("Pause", S.PauseRequest, self.pause),
            ("Resume", S.ResumeRequest, self.resume),
            ("Update", S.UpdateTaskRequest, self.update),
            ("Checkpoint", S.CheckpointTaskRequest, self.checkpoint),
            ("Stats", S.StatsRequest, self.stats),
            ("Connect", S.ConnectRequest, self.connect),
            ("Shutdown", S.ShutdownRequest, self.shutdown),
        ]
        for name, request_type, handler in methods:
            server.register_unary(service, name, request_type, _translating(handler))
        # State waits for nothing and is polled (containerd, kubelet): the reader answers it itself.
        server.register_unary_inline(service, "State", S.StateRequest, _translating_now(self.state))

    def _container(self, id: str) -> Container:
        try:
            return self.containers[id]
        except KeyError:
            raise NotFound(f"container {id} not found: not found") from None

    def _process(self, id: str, exec_id: str) -> tuple[Container, Process]:
        container = self._container(id)
        return container, container.process(exec_id)

    # -- RPCs ---------------------------------------------------------------

    async def create(self, req: shim_pb2.CreateTaskRequest, _: CallContext) -> shim_pb2.CreateTaskResponse:
        log.debug("%s: create", req.id)
        check_id("container id", req.id)
        if req.id in self.containers:
            raise AlreadyExists(f"container {req.id}: already exists")
        _need_fds(f"create {req.id}", self._adding)
        request = CreateRequest(
            id=req.id,
            bundle=req.bundle,
            rootfs=[MountSpec(m.type, m.source, list(m.options)) for m in req.rootfs],
            stdio=StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
            options=options_from_any(req.options.type_url, req.options.value),
            checkpoint=req.checkpoint,
            parent_checkpoint=req.parent_checkpoint,
        )
        container = Container(request, self.ctx)
        self.containers[req.id] = container  # reserve the id while runc works
        try:
            with self._adding:
                pid = await container.create()
        except BaseException:
            del self.containers[req.id]
            raise
        return shim_pb2.CreateTaskResponse(pid=pid)

    async def start(self, req: shim_pb2.StartRequest, _: CallContext) -> shim_pb2.StartResponse:
        container = self._container(req.id)
        if req.exec_id:
            _need_fds(f"exec {req.exec_id} in {req.id}", self._adding)
            with self._adding:
                return shim_pb2.StartResponse(pid=await container.start(req.exec_id))
        return shim_pb2.StartResponse(pid=await container.start(req.exec_id))

    def state(self, req: shim_pb2.StateRequest, _: CallContext) -> bytes:
        """The reply, serialized. containerd and kubelet poll State, and of its fields only the
        pid, the status and the exit change in a process's life (the id, bundle and stdio paths
        are fixed at its creation), so the bytes are kept per process and sent again while
        those three are what they were."""
        container, process = self._process(req.id, req.exec_id)
        key = (process.pid, process.state, process.exit)
        kept = self._state_replies.get(process)
        if kept is not None and kept[0] == key:
            return kept[1]
        reply = self._state_response(container, process).SerializeToString()
        self._state_replies[process] = (key, reply)
        return reply

    @staticmethod
    def _state_response(container: Container, process: Process) -> shim_pb2.StateResponse:
        paths = process.stdio
        reply = shim_pb2.StateResponse(
            id=process.exec_id or container.id,
            bundle=container.bundle,
            pid=process.pid,
            status=_STATUS[process.state],
            stdin=paths.stdin,
            stdout=paths.stdout,
            stderr=paths.stderr,
            terminal=paths.terminal,
            exec_id=process.exec_id,
        )
        if process.exit is not None:
            reply.exit_status = process.exit.status
            reply.exited_at.CopyFrom(ev.timestamp(process.exit.exited_at))
        return reply

    async def wait(self, req: shim_pb2.WaitRequest, _: CallContext) -> shim_pb2.WaitResponse:
        _container, process = self._process(req.id, req.exec_id)
        exit = await process.wait()
        return shim_pb2.WaitResponse(exit_status=exit.status, exited_at=ev.timestamp(exit.exited_at))

    async def kill(self, req: shim_pb2.KillRequest, _: CallContext) -> empty_pb2.Empty:
        await self._container(req.id).kill(req.exec_id, req.signal, req.all)
        return empty_pb2.Empty()

    async def pids(self, req: shim_pb2.PidsRequest, _: CallContext) -> shim_pb2.PidsResponse:
        reply = shim_pb2.PidsResponse()
        for pid, exec_id in await self._container(req.id).pids():
            info = reply.processes.add(pid=pid)
            if exec_id:
                details = runc_options_pb2.ProcessDetails(exec_id=exec_id)
                info.info.type_url = PROCESS_DETAILS_TYPE
                info.info.value = details.SerializeToString()
        return reply

    async def delete(self, req: shim_pb2.DeleteRequest, _: CallContext) -> shim_pb2.DeleteResponse:
        container = self._container(req.id)
        process = await container.delete(req.exec_id)
        if not req.exec_id:
            del self.containers[req.id]
        reply = shim_pb2.DeleteResponse(pid=process.pid)
        if process.exit is not None:
            reply.exit_status = process.exit.status
            reply.exited_at.CopyFrom(ev.timestamp(process.exit.exited_at))
        return reply

    async def exec(self, req: shim_pb2.ExecProcessRequest, _: CallContext) -> empty_pb2.Empty:
        check_id("exec id", req.exec_id)
        stdio = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
        self._container(req.id).add_exec(req.exec_id, stdio, req.spec.value)
        return empty_pb2.Empty()

    async def close_io(self, req: shim_pb2.CloseIORequest, _: CallContext) -> empty_pb2.Empty:
        container = self._container(req.id)
        if req.stdin:
            container.close_io(req.exec_id)
        return empty_pb2.Empty()

    async def resize_pty(self, req: shim_pb2.ResizePtyRequest, _: CallContext) -> empty_pb2.Empty:
        self._container(req.id).resize_pty(req.exec_id, req.width, req.height)
        return empty_pb2.Empty()

    async def pause(self, req: shim_pb2.PauseRequest, _: CallContext) -> empty_pb2.Empty:
        await self._container(req.id).pause()
        return empty_pb2.Empty()

    async def resume(self, req: shim_pb2.ResumeRequest, _: CallContext) -> empty_pb2.Empty:
        await self._container(req.id).resume()
        return empty_pb2.Empty()

    async def update(self, req: shim_pb2.UpdateTaskRequest, _: CallContext) -> empty_pb2.Empty:
        await self._container(req.id).update(req.resources.value)
        return empty_pb2.Empty()

    async def checkpoint(self, req: shim_pb2.CheckpointTaskRequest, _: CallContext) -> empty_pb2.Empty:
        request = CheckpointRequest(path=req.path)
        if req.options.value and type_name(req.options.type_url) == CHECKPOINT_OPTIONS_TYPE:
            opts = runc_options_pb2.CheckpointOptions.FromString(req.options.value)
            request = CheckpointRequest(
                path=req.path,
                exit=opts.exit,
                open_tcp=opts.open_tcp,
                external_unix_sockets=opts.external_unix_sockets,
                terminal=opts.terminal,
                file_locks=opts.file_locks,
                empty_namespaces=list(opts.empty_namespaces),
                cgroups_mode=opts.cgroups_mode,
                work_path=opts.work_path,
            )
        await self._container(req.id).checkpoint(request)
        return empty_pb2.Empty()

    async def stats(self, req: shim_pb2.StatsRequest, _: CallContext) -> shim_pb2.StatsResponse:
        container = self._container(req.id)
        cgroup = container.cgroup
        if cgroup is None:
            raise NotFound(f"cgroup of {container.id} does not exist")
        # A dead init's pid may be reused: no network stats from its /proc then.
        pid = 0 if container.init.reaped else container.init.pid

        def read() -> any_pb2.Any:  # cgroup and /proc files: in a worker thread
            return cgroup.metrics_any(network=network_stats(pid) if pid else [])

        try:
            return shim_pb2.StatsResponse(stats=await trio.to_thread.run_sync(read))
        except (OSError, ValueError) as e:
            raise ShimError(f"reading cgroup stats of {container.id}: {e}") from e

    async def connect(self, req: shim_pb2.ConnectRequest, _: CallContext) -> shim_pb2.ConnectResponse:
        container = self.containers.get(req.id)
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0, version=self.version
        )

    async def shutdown(self, req: shim_pb2.ShutdownRequest, _: CallContext) -> empty_pb2.Empty:
        """Exit once no container is left, as the Go shim does: never while one exists, ``now``
        or not (exiting would orphan its processes and lose its exit). ``now`` only skips the
        grace in-flight calls get."""
        if self.containers:
            return empty_pb2.Empty()
        self.shutdown_now = self.shutdown_now or req.now
        self.shutdown_requested.set()
        return empty_pb2.Empty()


def _translating(handler: Callable[..., Awaitable[Message]]) -> Callable[..., Awaitable[Message]]:
    """Turn domain errors into ttrpc statuses with the same code."""

    async def call(request: Message, ctx: CallContext) -> Message:
        try:
            return await handler(request, ctx)
        except (ShimError, OSError) as e:
            if (status := _translated(e)) is None:
                raise
            raise status from e

    return call


def _translating_now(handler: Callable[..., Message | bytes]) -> Callable[..., Message | bytes]:
    """``_translating`` for a handler run inline (a plain function)."""

    def call(request: Message, ctx: CallContext) -> Message | bytes:
        try:
            return handler(request, ctx)
        except (ShimError, OSError) as e:
            if (status := _translated(e)) is None:
                raise
            raise status from e

    return call


def _translated(e: ShimError | OSError) -> TTRPCError | None:
    """The status a domain error or fd exhaustion becomes; None: any other OSError, a bug."""
    if isinstance(e, ShimError):
        return TTRPCError(Code(e.code), e.message)
    if not nofile.exhausted(e):
        return None
    return TTRPCError(Code.RESOURCE_EXHAUSTED, f"{e}: the shim is at its open-file limit")


def _need_fds(what: str, adding: InFlight) -> None:
    """Refuse to add a process when its fds, with those of the ones being added now, would
    eat into the reserve that keeps every task killable and deletable (shim.common.nofile.Reserve)."""
    if not nofile.reserve.room(nofile.PER_TASK * (adding.count + 1)):
        raise ResourceExhausted(f"{what}: too many open files (the shim is at its open-file limit of "
                                f"{nofile.current()}; running tasks can still be killed and deleted)")
