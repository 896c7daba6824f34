"""shim.daemon.events: Any packing and the EventPublisher against a real in-process ttrpc server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from shim.daemon import events
from shim.daemon.events import NAMESPACE_METADATA, SERVICE, EventPublisher, pack_any, timestamp
from shim.proto import events_pb2, events_service_pb2
from shim.ttrpc import CallContext, Code, Server, TTRPCError


def test_pack_any_uses_bare_type_name() -> None:
    msg = events_pb2.TaskExit(container_id="c1", pid=42, exit_status=137)
    packed = pack_any(msg)
    assert packed.type_url == "containerd.events.TaskExit"
    assert events_pb2.TaskExit.FromString(packed.value) == msg


def test_timestamp() -> None:
    ts = timestamp(1700000000.5)
    assert (ts.seconds, ts.nanos) == (1700000000, 500_000_000)


#: containerd's ttrpc events service (api/services/ttrpc/events/v1/events.proto), from the descriptor
EVENTS_SERVICE = events_service_pb2.DESCRIPTOR.services_by_name["Events"]
#: the metadata key containerd's namespaces package reads on ttrpc (namespaces.TTRPCHeader)
CONTAINERD_TTRPC_NAMESPACE_HEADER = "containerd-namespace-ttrpc"


def test_service_name() -> None:
    assert SERVICE == "containerd.services.events.ttrpc.v1.Events"
    assert NAMESPACE_METADATA == "containerd-namespace-ttrpc"
    # not restated but derived: the service and method as containerd's proto declares them
    assert EVENTS_SERVICE.full_name == SERVICE
    forward = EVENTS_SERVICE.methods_by_name["Forward"]
    assert forward.input_type is events_service_pb2.ForwardRequest.DESCRIPTOR
    assert forward.output_type.full_name == "google.protobuf.Empty"
    assert NAMESPACE_METADATA == CONTAINERD_TTRPC_NAMESPACE_HEADER


async def test_publisher_calls_the_method_containerd_serves(sock_path: Path) -> None:
    """Over the wire: a server that knows only containerd's names (from the proto, not our
    constants) gets the event, with the namespace under containerd's metadata key only."""
    got = Received(expect=1)
    server = Server()
    server.register(EVENTS_SERVICE.full_name, EVENTS_SERVICE.methods_by_name["Forward"].name, got.forward)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    sock.listen(16)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock)
            pub = EventPublisher(str(sock_path), "ns1")
            nursery.start_soon(pub.run)
            publish_starts(pub, range(7, 8))
            assert await pub.drain(30) is True
            nursery.cancel_scope.cancel()
    assert got.pids == [7]
    assert got.metadata == [{CONTAINERD_TTRPC_NAMESPACE_HEADER: ["ns1"]}]
    assert got.envelopes[0].namespace == "ns1" and got.envelopes[0].topic == "/tasks/start"


@dataclass
class Received:
    envelopes: list[events_service_pb2.Envelope] = field(default_factory=list)
    metadata: list[dict[str, list[str]]] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)
    expect: int = 0

    async def forward(self, payload: bytes, ctx: CallContext) -> bytes:
        req = events_service_pb2.ForwardRequest.FromString(payload)
        self.envelopes.append(req.envelope)
        self.metadata.append(ctx.metadata)
        if len(self.envelopes) >= self.expect:
            self.arrived.set()
        return b""  # google.protobuf.Empty

    @property
    def topics(self) -> list[str]:
        return [e.topic for e in self.envelopes]

    @property
    def pids(self) -> list[int]:
        return [decode(e).pid for e in self.envelopes]


def decode(envelope: events_service_pb2.Envelope):
    name = envelope.event.type_url
    cls = getattr(events_pb2, name.rsplit(".", 1)[-1])
    assert cls.DESCRIPTOR.full_name == name
    return cls.FromString(envelope.event.value)


@asynccontextmanager
async def serving(path: Path, handler) -> AsyncIterator[None]:
    server = Server()
    server.register(SERVICE, "Forward", handler)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        yield
        nursery.cancel_scope.cancel()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ev.sock"


def publish_starts(pub: EventPublisher, pids: range) -> None:
    for pid in pids:
        pub.publish(events.TASK_START, events_pb2.TaskStart(container_id="c1", pid=pid))


async def test_events_arrive_in_order_with_namespace(sock_path: Path) -> None:
    got = Received(expect=3)
    with trio.fail_after(5):
        async with serving(sock_path, got.forward), trio.open_nursery() as nursery:
            pub = EventPublisher(str(sock_path), "k8s.io")
            nursery.start_soon(pub.run)
            pub.publish(events.TASK_CREATE, events_pb2.TaskCreate(container_id="c1", bundle="/b", pid=10))
            pub.publish(events.TASK_START, events_pb2.TaskStart(container_id="c1", pid=10))
            pub.publish(events.TASK_EXIT, events_pb2.TaskExit(container_id="c1", id="c1", pid=10, exit_status=7))
            assert pub.pending == 3
            assert await pub.drain(4) is True
            assert pub.pending == 0
            nursery.cancel_scope.cancel()
    assert got.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert [e.event.type_url for e in got.envelopes] == [
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskExit",
    ]
    assert all(e.namespace == "k8s.io" for e in got.envelopes)
    assert all(md.get(NAMESPACE_METADATA) == ["k8s.io"] for md in got.metadata)
    assert decode(got.envelopes[2]) == events_pb2.TaskExit(container_id="c1", id="c1", pid=10, exit_status=7)
    stamps = [e.timestamp.ToNanoseconds() for e in got.envelopes]
    assert stamps == sorted(stamps) and stamps[0] > 0


async def test_unix_scheme_address(sock_path: Path) -> None:
    got = Received(expect=1)
    with trio.fail_after(5):
        async with serving(sock_path, got.forward), trio.open_nursery() as nursery:
            pub = EventPublisher("unix://" + str(sock_path), "default")
            nursery.start_soon(pub.run)
            publish_starts(pub, range(1, 2))
            assert await pub.drain(4) is True
            nursery.cancel_scope.cancel()
    assert got.pids == [1]


def unreachable_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum("containerd events unreachable" in r.getMessage() for r in caplog.records)


async def wait_unreachable(caplog: pytest.LogCaptureFixture, more_than: int) -> None:
    """Until the publisher has tried (and failed) to send once more than ``more_than`` times."""
    while unreachable_warnings(caplog) <= more_than:
        await trio.sleep(0.01)


async def test_events_retried_until_server_listens(sock_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="shim.events")
    got = Received(expect=6)
    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            pub = EventPublisher(str(sock_path), "default")
            outer.start_soon(pub.run)
            publish_starts(pub, range(1, 4))
            # Nobody listens: the publisher tried, nothing could be sent, nothing is dropped.
            await wait_unreachable(caplog, 0)
            assert pub.pending == 3
            assert await pub.drain(0.3) is False
            assert pub.pending == 3
            async with serving(sock_path, got.forward):
                publish_starts(pub, range(4, 7))
                assert await pub.drain(5) is True
            outer.cancel_scope.cancel()
    assert got.pids == [1, 2, 3, 4, 5, 6]  # each exactly once, in publish order


async def test_events_retried_after_server_restart(sock_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="shim.events")
    got = Received()
    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            pub = EventPublisher(str(sock_path), "default")
            outer.start_soon(pub.run)
            async with serving(sock_path, got.forward):
                publish_starts(pub, range(1, 3))
                assert await pub.drain(4) is True
            sock_path.unlink()  # containerd went away
            before = unreachable_warnings(caplog)
            publish_starts(pub, range(3, 5))
            await wait_unreachable(caplog, before)  # it tried to send them, and could not
            assert pub.pending == 2
            async with serving(sock_path, got.forward):
                assert await pub.drain(5) is True
            outer.cancel_scope.cancel()
    assert got.pids == [1, 2, 3, 4]


async def test_unavailable_is_retried_without_reordering(sock_path: Path) -> None:
    got = Received()
    failures = [Code.UNAVAILABLE, Code.INVALID_ARGUMENT]

    async def flaky(payload: bytes, ctx: CallContext) -> bytes:
        if failures:
            raise TTRPCError(failures.pop(0), "not now")
        return await got.forward(payload, ctx)

    with trio.fail_after(10):
        async with serving(sock_path, flaky), trio.open_nursery() as nursery:
            pub = EventPublisher(str(sock_path), "default")
            nursery.start_soon(pub.run)
            publish_starts(pub, range(1, 4))
            assert await pub.drain(5) is True
            nursery.cancel_scope.cancel()
    assert got.pids == [1, 2, 3]


async def test_drain_true_when_nothing_queued() -> None:
    pub = EventPublisher("/nonexistent.sock", "default")
    with trio.fail_after(1):
        assert await pub.drain(0.5) is True


async def test_no_address_drops_events() -> None:
    pub = EventPublisher("", "default")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.run)
            publish_starts(pub, range(1, 3))
            assert await pub.drain(1) is True
            assert pub.pending == 0
            nursery.cancel_scope.cancel()


async def test_events_beyond_the_memory_limit_spill_and_arrive_in_order_once(sock_path: Path, tmp_path: Path,
                                                                              caplog) -> None:
    """containerd away while 20 000 events are published: at most MEMORY_LIMIT stay in
    memory, the rest wait in the spill file; all arrive once, in order, when it is back."""
    from shim.daemon.event_queue import MEMORY_LIMIT

    caplog.set_level("WARNING", logger="shim.events")
    total = 20_000
    got = Received(expect=total)
    with trio.fail_after(120):
        async with trio.open_nursery() as outer:
            pub = EventPublisher(str(sock_path), "default", spill_directory=str(tmp_path))
            outer.start_soon(pub.run)
            publish_starts(pub, range(1, total + 1))
            await wait_unreachable(caplog, 0)
            assert pub.pending == total
            assert pub._queue.in_memory <= MEMORY_LIMIT
            while pub._queue.spilled and pub._queue._chunk_count > 4096:  # chunks are written out
                await trio.sleep(0.01)
            assert len(pub._queue._chunk) < 2 * 64 * 1024
            async with serving(sock_path, got.forward):
                assert await pub.drain(100) is True
            outer.cancel_scope.cancel()
    assert got.pids == list(range(1, total + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["ev.sock"]  # the spill file has no name: nothing to clean
