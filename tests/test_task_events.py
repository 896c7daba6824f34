"""shim.daemon.task_events: each domain report becomes containerd's topic and message."""

from __future__ import annotations

from google.protobuf.message import Message

from shim.common.mount import MountSpec
from shim.daemon import events as ev
from shim.daemon.stdio import StdioPaths
from shim.daemon.task_events import TaskEvents
from shim.proto import events_pb2


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []

    def publish(self, topic: str, event: Message) -> None:
        self.published.append((topic, event))


def test_every_report_is_the_containerd_event() -> None:
    rec = Recorder()
    events = TaskEvents(rec)
    events.created("c1", "/b", [MountSpec("overlay", "overlay", ["ro"])], StdioPaths("/i", "/o", "/e", True), "", 10)
    events.started("c1", 10)
    events.exec_added("c1", "e1")
    events.exec_started("c1", "e1", 11)
    events.exited("c1", "e1", 11, 3, 1.5)
    events.paused("c1")
    events.resumed("c1")
    events.oom("c1")
    events.checkpointed("c1", "/img")
    events.deleted("c1", 10, 137, 2.25)
    events.deleted("c2", 0, 0, None)
    assert rec.published == [
        (ev.TASK_CREATE, events_pb2.TaskCreate(
            container_id="c1", bundle="/b", pid=10,
            rootfs=[{"type": "overlay", "source": "overlay", "options": ["ro"]}],
            io=events_pb2.TaskIO(stdin="/i", stdout="/o", stderr="/e", terminal=True))),
        (ev.TASK_START, events_pb2.TaskStart(container_id="c1", pid=10)),
        (ev.TASK_EXEC_ADDED, events_pb2.TaskExecAdded(container_id="c1", exec_id="e1")),
        (ev.TASK_EXEC_STARTED, events_pb2.TaskExecStarted(container_id="c1", exec_id="e1", pid=11)),
        (ev.TASK_EXIT, events_pb2.TaskExit(container_id="c1", id="e1", pid=11, exit_status=3,
                                           exited_at=ev.timestamp(1.5))),
        (ev.TASK_PAUSED, events_pb2.TaskPaused(container_id="c1")),
        (ev.TASK_RESUMED, events_pb2.TaskResumed(container_id="c1")),
        (ev.TASK_OOM, events_pb2.TaskOOM(container_id="c1")),
        (ev.TASK_CHECKPOINTED, events_pb2.TaskCheckpointed(container_id="c1", checkpoint="/img")),
        (ev.TASK_DELETE, events_pb2.TaskDelete(container_id="c1", pid=10, exit_status=137,
                                               exited_at=ev.timestamp(2.25))),
        (ev.TASK_DELETE, events_pb2.TaskDelete(container_id="c2")),
    ]
    assert not rec.published[-1][1].HasField("exited_at")
