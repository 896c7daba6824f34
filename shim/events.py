"""Publishing task events to containerd, in order, without dropping any.

One FIFO queue per shim and one task draining it over a ttrpc connection to
containerd (``TTRPC_ADDRESS``), calling
``containerd.services.events.ttrpc.v1.Events/Forward``. ``publish`` is
synchronous and never blocks, so the domain can enqueue an event at the exact
point its state changes; that is what keeps create → start → exit → delete in
order. While containerd cannot be reached the head event is retried with
backoff and nothing behind it overtakes it. Only an event containerd itself
rejects (a status other than Unavailable/DeadlineExceeded) is given up after a
few tries, so one bad event cannot wedge the queue forever.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import trio
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from .proto import events_service_pb2
from .ttrpc import Client, Code, TTRPCError, open_client

log = logging.getLogger("shim.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_METADATA = "containerd-namespace-ttrpc"
SEND_TIMEOUT = 5.0
MAX_BACKOFF = 2.0
MAX_REJECTIONS = 5

TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
TASK_EXEC_ADDED = "/tasks/exec-added"
TASK_EXEC_STARTED = "/tasks/exec-started"
TASK_PAUSED = "/tasks/paused"
TASK_RESUMED = "/tasks/resumed"
TASK_OOM = "/tasks/oom"
TASK_CHECKPOINTED = "/tasks/checkpointed"


def pack_any(message: Message) -> any_pb2.Any:
    """containerd's typeurl uses the bare proto name, with no type.googleapis.com/ prefix."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass
class _Pending:
    topic: str
    payload: bytes
    rejections: int = 0


class EventPublisher:
    def __init__(self, ttrpc_address: str, namespace: str) -> None:
        self.address = ttrpc_address
        self.namespace = namespace
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = trio.Event()
        self._empty = trio.Event()
        self._empty.set()

    def publish(self, topic: str, event: Message) -> None:
        """Enqueue an event; it is timestamped now, sent later, in order."""
        envelope = events_service_pb2.Envelope(
            timestamp=timestamp(time.time()), namespace=self.namespace, topic=topic, event=pack_any(event)
        )
        payload = events_service_pb2.ForwardRequest(envelope=envelope).SerializeToString()
        self._queue.append(_Pending(topic, payload))
        if self._empty.is_set():
            self._empty = trio.Event()
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued event was sent; False if time ran out."""
        with trio.move_on_after(timeout):
            await self._empty.wait()
            return True
        return False

    async def run(self) -> None:
        backoff = 0.05
        while True:
            await self._wait_for_events()
            if not self.address:
                log.debug("no TTRPC_ADDRESS: dropping %d events", len(self._queue))
                self._queue.clear()
                self._empty.set()
                continue
            try:
                async with open_client(self.address) as client:
                    backoff = 0.05
                    await self._send_queued(client)
            except (OSError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.warning("containerd events unreachable (%s); retrying in %.2fs", e, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _wait_for_events(self) -> None:
        while not self._queue:
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def _send_queued(self, client: Client) -> None:
        metadata = [(NAMESPACE_METADATA, self.namespace)]
        while True:
            await self._wait_for_events()
            head = self._queue[0]
            try:
                await client.call(SERVICE, "Forward", head.payload, metadata=metadata, timeout=SEND_TIMEOUT)
            except TTRPCError as e:
                if e.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                    raise ConnectionError(str(e)) from e
                head.rejections += 1
                log.error("containerd rejected event %s: %s", head.topic, e)
                if head.rejections < MAX_REJECTIONS:
                    await trio.sleep(0.1 * head.rejections)
                    continue
                log.error("giving up on event %s after %d rejections", head.topic, head.rejections)
            self._queue.popleft()
            if not self._queue:
                self._empty.set()
