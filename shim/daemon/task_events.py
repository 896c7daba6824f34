"""Task events as containerd receives them: the one place the domain's events become protobuf.

The container logic (``shim.daemon.container``, ``shim.daemon.exits``) reports what happened
through the ``TaskEventSink`` protocol with plain values; ``TaskEvents``
turns each report into the containerd.events message and its topic and hands
it to the publisher, which keeps the order. Unit tests pass a recorder
instead, so the domain never needs protobuf.
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf.message import Message

from shim.common.mount import MountSpec
from shim.proto import events_pb2, mount_pb2

from . import events as ev
from .stdio import StdioPaths


class TaskEventSink(Protocol):
    def created(self, id: str, bundle: str, rootfs: list[MountSpec], stdio: StdioPaths, checkpoint: str,
                pid: int) -> None: ...

    def started(self, id: str, pid: int) -> None: ...

    def exited(self, id: str, process_id: str, pid: int, status: int, exited_at: float) -> None: ...

    def deleted(self, id: str, pid: int, status: int, exited_at: float | None) -> None: ...

    def exec_added(self, id: str, exec_id: str) -> None: ...

    def exec_started(self, id: str, exec_id: str, pid: int) -> None: ...

    def paused(self, id: str) -> None: ...

    def resumed(self, id: str) -> None: ...

    def oom(self, id: str) -> None: ...

    def checkpointed(self, id: str, path: str) -> None: ...


class Publisher(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


class TaskEvents:
    """TaskEventSink onto an EventPublisher (anything with ``publish(topic, message)``)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def created(self, id: str, bundle: str, rootfs: list[MountSpec], stdio: StdioPaths, checkpoint: str,
                pid: int) -> None:
        self.publisher.publish(ev.TASK_CREATE, events_pb2.TaskCreate(
            container_id=id,
            bundle=bundle,
            rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in rootfs],
            io=events_pb2.TaskIO(stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr, terminal=stdio.terminal),
            checkpoint=checkpoint,
            pid=pid,
        ))

    def started(self, id: str, pid: int) -> None:
        self.publisher.publish(ev.TASK_START, events_pb2.TaskStart(container_id=id, pid=pid))

    def exited(self, id: str, process_id: str, pid: int, status: int, exited_at: float) -> None:
        self.publisher.publish(ev.TASK_EXIT, events_pb2.TaskExit(
            container_id=id, id=process_id, pid=pid, exit_status=status, exited_at=ev.timestamp(exited_at)
        ))

    def deleted(self, id: str, pid: int, status: int, exited_at: float | None) -> None:
        self.publisher.publish(ev.TASK_DELETE, events_pb2.TaskDelete(
            container_id=id, pid=pid, exit_status=status,
            exited_at=ev.timestamp(exited_at) if exited_at is not None else None,
        ))

    def exec_added(self, id: str, exec_id: str) -> None:
        self.publisher.publish(ev.TASK_EXEC_ADDED, events_pb2.TaskExecAdded(container_id=id, exec_id=exec_id))

    def exec_started(self, id: str, exec_id: str, pid: int) -> None:
        self.publisher.publish(ev.TASK_EXEC_STARTED,
                               events_pb2.TaskExecStarted(container_id=id, exec_id=exec_id, pid=pid))

    def paused(self, id: str) -> None:
        self.publisher.publish(ev.TASK_PAUSED, events_pb2.TaskPaused(container_id=id))

    def resumed(self, id: str) -> None:
        self.publisher.publish(ev.TASK_RESUMED, events_pb2.TaskResumed(container_id=id))

    def oom(self, id: str) -> None:
        self.publisher.publish(ev.TASK_OOM, events_pb2.TaskOOM(container_id=id))

    def checkpointed(self, id: str, path: str) -> None:
        self.publisher.publish(ev.TASK_CHECKPOINTED, events_pb2.TaskCheckpointed(container_id=id, checkpoint=path))
