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

Memory stays bounded however long containerd stays away: past a thousand
events the queue spills to an unnamed file (``shim.daemon.event_queue``), written and
read back in worker threads. Delivery is at least once: an event whose
Forward was cut by a broken connection is sent again on the next one (containerd
may then see it twice); in the normal path every event is sent exactly once.
"""

from __future__ import annotations

import logging
import time

import trio
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from shim.proto import events_service_pb2
from shim.ttrpc import Client, Code, TTRPCError, open_client

from .event_queue import EventQueue, Pending

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


class EventPublisher:
    def __init__(self, ttrpc_address: str, namespace: str, spill_directory: str = ".") -> None:
        self.address = ttrpc_address
        self.namespace = namespace
        self._queue = EventQueue(spill_directory)
        self._spill_wakeup = trio.Event()
        self._wakeup = trio.Event()
        self._empty = trio.Event()
        self._empty.set()

    def publish(self, topic: str, event: Message) -> None:
        """Enqueue an event; it is timestamped now, sent later, in order."""
        envelope = events_service_pb2.Envelope(
            timestamp=timestamp(time.time()), namespace=self.namespace, topic=topic, event=pack_any(event)
        )
        payload = events_service_pb2.ForwardRequest(envelope=envelope).SerializeToString()
        self._queue.append(Pending(topic, payload))
        if self._empty.is_set():
            self._empty = trio.Event()
        self._wakeup.set()
        if self._queue.needs_flush():
            self._spill_wakeup.set()

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
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._spill)
                await self._publish()
        finally:
            self._queue.close()

    async def _spill(self) -> None:
        """Write spilled events out as chunks fill (the file IO in a worker thread)."""
        while True:
            while not self._queue.needs_flush():
                self._spill_wakeup = trio.Event()
                await self._spill_wakeup.wait()
            data, offset, count = self._queue.take_chunk()
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._queue.write, data, offset)
            except OSError as e:
                log.error("event spill file: %s; %d events kept in memory for now", e, count)
                self._queue.flush_failed(data, count)
                await trio.sleep(1.0)
                continue
            self._queue.flushed(len(data), count)
            self._wakeup.set()  # a publisher may wait for them to be readable

    async def _head(self) -> Pending | None:
        """The oldest event, read back from the spill file if it is there."""
        if self._queue.needs_refill():
            offset, length = self._queue.refill_range()
            data = await trio.to_thread.run_sync(self._queue.read, offset, length)
            self._queue.refilled(data)
        return self._queue.head()

    async def _publish(self) -> None:
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

    async def _wait_for_events(self) -> Pending:
        while True:
            head = await self._head() if self._queue else None
            if head is not None:
                return head
            self._wakeup = trio.Event()  # nothing queued, or the next ones are still being written
            await self._wakeup.wait()

    async def _send_queued(self, client: Client) -> None:
        metadata = [(NAMESPACE_METADATA, self.namespace)]
        while True:
            head = await self._wait_for_events()
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
