"""The task service: ttrpc methods of ``containerd.task.v2.Task`` mapped onto containers.

Thin on purpose: decode the request, find the container, call the domain,
encode the reply. Domain errors carry their containerd code and become ttrpc
statuses here.
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

import trio
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from . import events as ev
from .container import Container, Context, CreateRequest
from .errors import AlreadyExists, NotFound, ShimError
from .mount import MountSpec
from .options import from_any
from .process import Process, State
from .proto import shim_pb2, task_types_pb2
from .stdio import StdioPaths
from .ttrpc import CallContext, Code, Server, TTRPCError

log = logging.getLogger("shim.service")

SERVICE_V2 = "containerd.task.v2.Task"

_STATUS = {
    State.CREATED: task_types_pb2.CREATED,
    State.RUNNING: task_types_pb2.RUNNING,
    State.PAUSED: task_types_pb2.PAUSED,
    State.STOPPED: task_types_pb2.STOPPED,
    State.DELETED: task_types_pb2.STOPPED,
}


class TaskService:
    def __init__(self, ctx: Context, *, version: str = "") -> None:
        self.ctx = ctx
        self.version = version
        self.containers: dict[str, Container] = {}
        self.shutdown_requested = trio.Event()

    def register(self, server: Server, service: str = SERVICE_V2) -> None:
        S = shim_pb2
        methods: list[tuple[str, type[Message], Callable]] = [
            ("Create", S.CreateTaskRequest, self.create),
            ("Start", S.StartRequest, self.start),
            ("State", S.StateRequest, self.state),
            ("Wait", S.WaitRequest, self.wait),
            ("Kill", S.KillRequest, self.kill),
            ("Pids", S.PidsRequest, self.pids),
            ("Delete", S.DeleteRequest, self.delete),
            ("Connect", S.ConnectRequest, self.connect),
            ("Shutdown", S.ShutdownRequest, self.shutdown),
        ]
        for name, request_type, handler in methods:
            server.register_unary(service, name, request_type, _translating(handler))

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
        if req.id in self.containers:
            raise AlreadyExists(f"container {req.id}: already exists")
        if req.checkpoint:
            raise ShimError("restore from checkpoint is not supported yet")
        request = CreateRequest(
            id=req.id,
            bundle=req.bundle,
            rootfs=[MountSpec(m.type, m.source, list(m.options)) for m in req.rootfs],
            stdio=StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
            options=from_any(req.options.type_url, req.options.value),
        )
        container = Container(request, self.ctx)
        self.containers[req.id] = container  # reserve the id while runc works
        try:
            pid = await container.create()
        except BaseException:
            del self.containers[req.id]
            raise
        return shim_pb2.CreateTaskResponse(pid=pid)

    async def start(self, req: shim_pb2.StartRequest, _: CallContext) -> shim_pb2.StartResponse:
        container, process = self._process(req.id, req.exec_id)
        return shim_pb2.StartResponse(pid=await container.start())

    async def state(self, req: shim_pb2.StateRequest, _: CallContext) -> shim_pb2.StateResponse:
        container, process = self._process(req.id, req.exec_id)
        paths = container.request.stdio
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
        _, process = self._process(req.id, req.exec_id)
        exit = await process.wait()
        return shim_pb2.WaitResponse(exit_status=exit.status, exited_at=ev.timestamp(exit.exited_at))

    async def kill(self, req: shim_pb2.KillRequest, _: CallContext) -> empty_pb2.Empty:
        container, _process = self._process(req.id, req.exec_id)
        await container.kill(req.signal, req.all)
        return empty_pb2.Empty()

    async def pids(self, req: shim_pb2.PidsRequest, _: CallContext) -> shim_pb2.PidsResponse:
        container = self._container(req.id)
        pids = await container.pids()
        return shim_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=p) for p in pids])

    async def delete(self, req: shim_pb2.DeleteRequest, _: CallContext) -> shim_pb2.DeleteResponse:
        container, process = self._process(req.id, req.exec_id)
        process = await container.delete()
        del self.containers[req.id]
        reply = shim_pb2.DeleteResponse(pid=process.pid)
        if process.exit is not None:
            reply.exit_status = process.exit.status
            reply.exited_at.CopyFrom(ev.timestamp(process.exit.exited_at))
        return reply

    async def connect(self, req: shim_pb2.ConnectRequest, _: CallContext) -> shim_pb2.ConnectResponse:
        container = self.containers.get(req.id)
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0, version=self.version
        )

    async def shutdown(self, req: shim_pb2.ShutdownRequest, _: CallContext) -> empty_pb2.Empty:
        """Exit once no container is left (or at once with ``now``), as the Go shim does."""
        if self.containers and not req.now:
            return empty_pb2.Empty()
        self.shutdown_requested.set()
        return empty_pb2.Empty()


def _translating(handler: Callable[..., Awaitable[Message]]) -> Callable[..., Awaitable[Message]]:
    """Turn domain errors into ttrpc statuses with the same code."""

    async def call(request: Message, ctx: CallContext) -> Message:
        try:
            return await handler(request, ctx)
        except ShimError as e:
            raise TTRPCError(Code(e.code), e.message) from e

    return call
