"""ttrpc Server and Client over real unix sockets in tmp_path (no root needed)."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from shim.proto import status_pb2
from shim.ttrpc import CallContext, Client, Code, Server, TTRPCError, open_client
from shim.ttrpc.codec import MAX_PAYLOAD, ClientConnection, ResponseReceived

SVC = "test.v1.Echo"


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


@asynccontextmanager
async def running(server: Server, path: Path) -> AsyncIterator[trio.Nursery]:
    """Serve on ``path``; cancel the server when the block ends."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        yield nursery
        nursery.cancel_scope.cancel()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "t.sock"


class RawClient:
    """The sans-IO client over a bare socket, to see exactly what the server sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.proto = ClientConnection()
        self.received: list[ResponseReceived] = []  # read but not yet returned by response()

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def request(self, service: str, method: str, payload: bytes = b"", **kw: object) -> int:
        sid, data = self.proto.send_request(service, method, payload, **kw)  # type: ignore[arg-type]
        await self.stream.send_all(data)
        return sid

    async def response(self) -> ResponseReceived:
        """The next response; answers written back to back can arrive in one read."""
        with trio.fail_after(5):
            while not self.received:
                data = await self.stream.receive_some()
                assert data, "server closed the connection"
                self.received += self.proto.receive_data(data)
            return self.received.pop(0)


async def test_basic_call(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        assert await client.call(SVC, "Echo", b"hello") == b"hello"
        assert await client.call(SVC, "Echo", b"") == b""


async def test_connect_classmethod_with_unix_scheme(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path):
        async with await Client.connect(f"unix://{sock_path}") as client:
            assert await client.call(SVC, "Echo", b"x") == b"x"
        with pytest.raises(ConnectionError):
            await client.call(SVC, "Echo", b"x")


async def test_call_requires_async_with(sock_path: Path) -> None:
    server = Server()
    async with running(server, sock_path):
        client = await Client.connect(str(sock_path))
        with pytest.raises(RuntimeError):
            await client.call(SVC, "Echo", b"")
        await client.aclose()


async def test_register_unary(sock_path: Path) -> None:
    async def handler(req: status_pb2.Status, ctx: CallContext) -> status_pb2.Status:
        return status_pb2.Status(code=req.code + 1, message=req.message.upper())

    server = Server()
    server.register_unary(SVC, "Inc", status_pb2.Status, handler)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        out = await client.call(SVC, "Inc", status_pb2.Status(code=1, message="a").SerializeToString())
        assert status_pb2.Status.FromString(out) == status_pb2.Status(code=2, message="A")
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Inc", b"\xff\xff\xff")
        assert info.value.code == Code.INVALID_ARGUMENT


def test_duplicate_registration_rejected() -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    with pytest.raises(ValueError):
        server.register(SVC, "Echo", echo)


async def test_concurrent_calls_on_one_connection_overlap(sock_path: Path) -> None:
    started = 0
    both = trio.Event()

    async def rendezvous(payload: bytes, ctx: CallContext) -> bytes:
        nonlocal started
        started += 1
        if started == 2:
            both.set()
        await both.wait()  # deadlocks unless both handlers run at once
        return payload

    server = Server()
    server.register(SVC, "Meet", rendezvous)
    results: dict[bytes, bytes] = {}
    async with running(server, sock_path), open_client(str(sock_path)) as client:

        async def one(tag: bytes) -> None:
            results[tag] = await client.call(SVC, "Meet", tag)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, b"a")
                nursery.start_soon(one, b"b")
    assert results == {b"a": b"a", b"b": b"b"}


async def test_unknown_service_and_method(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        with pytest.raises(TTRPCError) as info:
            await client.call("no.such.Service", "Echo", b"")
        assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "service no.such.Service")
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Nope", b"")
        assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")
        assert await client.call(SVC, "Echo", b"still") == b"still"


async def test_handler_ttrpc_error_propagates(sock_path: Path) -> None:
    async def missing(payload: bytes, ctx: CallContext) -> bytes:
        raise TTRPCError(Code.NOT_FOUND, "container abc: not found")

    server = Server()
    server.register(SVC, "Get", missing)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Get", b"")
        assert info.value.code == Code.NOT_FOUND
        assert info.value.message == "container abc: not found"


async def test_handler_crash_is_unknown_and_server_survives(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(payload: bytes, ctx: CallContext) -> bytes:
        raise RuntimeError("boom")

    async def wrong_type(payload: bytes, ctx: CallContext) -> bytes:
        return "not bytes"  # type: ignore[return-value]

    server = Server()
    server.register(SVC, "Crash", crash)
    server.register(SVC, "Wrong", wrong_type)
    server.register(SVC, "Echo", echo)
    caplog.set_level(logging.ERROR, logger="shim.ttrpc")
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Crash", b"")
        assert (info.value.code, info.value.message) == (Code.UNKNOWN, "boom")
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Wrong", b"")
        assert info.value.code == Code.UNKNOWN
        assert await client.call(SVC, "Echo", b"ok") == b"ok"
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_server_enforces_timeout_nano(sock_path: Path) -> None:
    cancelled = trio.Event()
    seen: list[CallContext] = []

    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx)
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        return b""

    server = Server()
    server.register(SVC, "Hang", hang)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        sid = await raw.request(SVC, "Hang", timeout_nano=50_000_000)
        resp = await raw.response()
        assert (resp.stream_id, resp.code) == (sid, Code.DEADLINE_EXCEEDED)
        assert cancelled.is_set()
        assert seen[0].deadline is not None
        await raw.stream.aclose()


async def test_client_timeout(sock_path: Path) -> None:
    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        await trio.sleep_forever()
        return b""

    server = Server()
    server.register(SVC, "Hang", hang)
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Hang", b"", timeout=0.05)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        assert await client.call(SVC, "Echo", b"after", timeout=5) == b"after"


async def test_metadata_and_no_deadline_reach_handler(sock_path: Path) -> None:
    seen: list[CallContext] = []

    async def record(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx)
        return b""

    server = Server()
    server.register(SVC, "Rec", record)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        await client.call(SVC, "Rec", b"", metadata=[("ns", "k8s.io"), ("x", "1"), ("x", "2")])
    [ctx] = seen
    assert (ctx.service, ctx.method, ctx.deadline) == (SVC, "Rec", None)
    assert ctx.metadata == {"ns": ["k8s.io"], "x": ["1", "2"]}


async def test_malformed_bytes_close_only_that_connection(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path), open_client(str(sock_path)) as good:
        bad = await trio.open_unix_socket(str(sock_path))
        await bad.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            assert await bad.receive_some() == b""  # server hung up
        await bad.aclose()
        assert await good.call(SVC, "Echo", b"fine") == b"fine"
        async with open_client(str(sock_path)) as fresh:
            assert await fresh.call(SVC, "Echo", b"new") == b"new"


async def test_reused_stream_id_closes_connection(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        sid, frame = raw.proto.send_request(SVC, "Echo", b"1")
        await raw.stream.send_all(frame)
        assert (await raw.response()).payload == b"1"
        raw.proto._pending.add(sid)  # pretend it is outstanding again
        await raw.stream.send_all(frame)
        with trio.fail_after(5):
            assert await raw.stream.receive_some() == b""
        await raw.stream.aclose()


@pytest.mark.parametrize("after", ["backwards", "not ttrpc"])
async def test_a_request_before_a_violation_is_answered_then_the_connection_closes(
    sock_path: Path, after: str
) -> None:
    """A valid request and, in the same write, a protocol violation: the request is answered
    (it was valid; Go answers it too), then the connection closes (Go keeps it)."""
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        _, first = raw.proto.send_request(SVC, "Echo", b"valid")
        _, second = raw.proto.send_request(SVC, "Echo", b"second")
        bad = first if after == "backwards" else b"GET / HTTP/1.1\r\n\r\n"
        await raw.stream.send_all(first + second + bad)
        # Each runs in its own task: their answers may come in either order (as from Go).
        answers = {(await raw.response()).payload, (await raw.response()).payload}
        assert answers == {b"valid", b"second"}
        with trio.fail_after(5):
            assert await raw.stream.receive_some() == b""
        await raw.stream.aclose()


async def test_oversize_request_answered_and_connection_kept(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        length = MAX_PAYLOAD + 1
        raw.proto._pending.add(1)
        raw.proto._next_id = 3
        async with trio.open_nursery() as nursery:
            # Send concurrently: the server answers before it has read it all.
            nursery.start_soon(raw.stream.send_all, struct.pack(">IIBB", length, 1, 1, 0) + b"\0" * length)
            resp = await raw.response()
        assert (resp.stream_id, resp.code) == (1, Code.RESOURCE_EXHAUSTED)
        await raw.request(SVC, "Echo", b"next")
        assert (await raw.response()).payload == b"next"
        await raw.stream.aclose()


async def test_client_rejects_oversize_request_locally(sock_path: Path) -> None:
    server = Server()
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path), open_client(str(sock_path)) as client:
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Echo", b"\0" * MAX_PAYLOAD)
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert await client.call(SVC, "Echo", b"ok") == b"ok"


async def test_close_lets_in_flight_call_finish(sock_path: Path) -> None:
    entered, release = trio.Event(), trio.Event()

    async def slow(payload: bytes, ctx: CallContext) -> bytes:
        entered.set()
        await release.wait()
        return b"done"

    server = Server()
    server.register(SVC, "Slow", slow)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    sock.listen(16)
    served = trio.Event()

    async def serve() -> None:
        await server.serve(sock)
        served.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with open_client(str(sock_path)) as client:
                result: list[bytes] = []

                async def call() -> None:
                    result.append(await client.call(SVC, "Slow", b""))

                async with trio.open_nursery() as calls:
                    calls.start_soon(call)
                    await entered.wait()
                    server.close()
                    # every task (serve's included) has run as far as it can: a serve() that
                    # returned without waiting for the handler would have set `served` by now
                    await trio.testing.wait_all_tasks_blocked()
                    assert not served.is_set()  # still waiting for the handler
                    assert result == []
                    with pytest.raises(OSError):
                        await trio.open_unix_socket(str(sock_path))  # no longer accepting
                    release.set()
                assert result == [b"done"]
            await served.wait()


async def test_client_disconnect_does_not_cancel_handler(sock_path: Path) -> None:
    entered, release, finished = trio.Event(), trio.Event(), trio.Event()
    cancelled: list[bool] = []

    async def slow(payload: bytes, ctx: CallContext) -> bytes:
        entered.set()
        try:
            await release.wait()
        except trio.Cancelled:
            cancelled.append(True)
            raise
        finished.set()
        return b"late"

    server = Server()
    server.register(SVC, "Slow", slow)
    server.register(SVC, "Echo", echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        await raw.request(SVC, "Slow")
        with trio.fail_after(5):
            await entered.wait()
            await raw.stream.aclose()
            # the server has read the EOF and done all it is going to do about it: a server
            # that cancels handlers of a gone client would have cancelled this one by now
            await trio.testing.wait_all_tasks_blocked()
            assert cancelled == [] and not finished.is_set()
            release.set()
            await finished.wait()
        assert cancelled == []
        async with open_client(str(sock_path)) as client:
            assert await client.call(SVC, "Echo", b"alive") == b"alive"


async def test_pending_call_gets_connection_error_when_server_goes(sock_path: Path) -> None:
    entered = trio.Event()

    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        entered.set()
        await trio.sleep_forever()
        return b""

    server = Server()
    server.register(SVC, "Hang", hang)
    async with open_client_after_start(server, sock_path) as (client, server_scope):
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                await entered.wait()
                server_scope.cancel()

            nursery.start_soon(stop)
            with trio.fail_after(5), pytest.raises(ConnectionError):
                await client.call(SVC, "Hang", b"")
        with pytest.raises(ConnectionError):
            await client.call(SVC, "Hang", b"")


@asynccontextmanager
async def open_client_after_start(
    server: Server, path: Path
) -> AsyncIterator[tuple[Client, trio.CancelScope]]:
    """Server in its own cancel scope so a test can kill it under a live client."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with running(server, path):
                    task_status.started()
                    await trio.sleep_forever()

        await nursery.start(run)
        async with open_client(str(path)) as client:
            yield client, scope


async def test_serve_stream_over_memory_streams() -> None:
    """serve_stream needs no socket: drive it with the sans-IO client."""
    from trio.testing import memory_stream_pair

    server = Server()
    server.register(SVC, "Echo", echo)
    client_end, server_end = memory_stream_pair()
    proto = ClientConnection()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        id1, d1 = proto.send_request(SVC, "Echo", b"one")
        id2, d2 = proto.send_request(SVC, "Nope", b"")
        await client_end.send_all(d1 + d2)
        events: list[ResponseReceived] = []
        with trio.fail_after(5):
            while len(events) < 2:
                events += proto.receive_data(await client_end.receive_some())
        by_id = {e.stream_id: e for e in events}
        assert (by_id[id1].code, by_id[id1].payload) == (Code.OK, b"one")
        assert by_id[id2].code == Code.UNIMPLEMENTED
        await client_end.aclose()  # EOF ends serve_stream


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to connect as another user")
async def test_a_peer_of_another_user_is_disconnected_unanswered() -> None:
    """As the Go shim's ttrpc server (UnixSocketRequireSameUser): only the shim's own user is served,
    even when the socket file's mode would let another connect."""
    import os
    import shutil
    import sys
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="ttrpc-peer-", dir="/tmp"))  # pytest's tmp dirs are 0700
    where.chmod(0o755)
    path = where / "open.sock"
    calls: list[bytes] = []

    async def record(payload: bytes, ctx: CallContext) -> bytes:
        calls.append(payload)
        return payload

    server = Server()
    server.register(SVC, "Echo", record)
    probe = (
        "import os, socket, sys\n"
        "from shim.ttrpc.codec import ClientConnection\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])\n"
        "try:\n"  # the server may hang up before the request is even sent: refused all the same
        f"    s.sendall(ClientConnection().send_request({SVC!r}, 'Echo', b'intruder')[1])\n"
        "    print(repr(s.recv(4096)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n    print(repr(b''))\n"
    )
    async with running(server, path):
        path.chmod(0o777)
        done = await trio.run_process([sys.executable, "-c", probe, str(path)], capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == b"b''"  # closed, no response
        async with open_client(str(path)) as client:  # our own user is still served
            assert await client.call(SVC, "Echo", b"owner") == b"owner"
    shutil.rmtree(where)
    assert calls == [b"owner"]


@pytest.mark.parametrize("kind", ["task", "inline"])
async def test_a_client_that_never_reads_answers_is_no_longer_read(sock_path: Path, kind: str) -> None:
    """Pipelined requests whose responses nobody drains: the server stops reading the connection
    after MAX_INFLIGHT_PER_CONNECTION of them, so memory stays bounded (issue 11 item 1), whether
    a task or the reader itself (inline) answers them."""
    from shim.ttrpc.server import MAX_INFLIGHT_PER_CONNECTION

    handled = 0

    def answer() -> bytes:
        nonlocal handled
        handled += 1
        return b"x" * 65536  # answers that fill the socket quickly

    async def big(payload: bytes, ctx: CallContext) -> bytes:
        return answer()

    server = Server()
    if kind == "inline":
        server.register_inline(SVC, "Big", lambda payload, ctx: answer())
    else:
        server.register(SVC, "Big", big)
    requests = 20000
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        frames = b"".join(raw.proto.send_request(SVC, "Big", b"")[1] for _ in range(requests))
        sent = 0
        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                async def send() -> None:
                    nonlocal sent
                    view = memoryview(frames)
                    while view:
                        n = min(len(view), 4096)
                        await raw.stream.send_all(view[:n])
                        sent += n
                        view = view[n:]
                nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                nursery.cancel_scope.cancel()
        assert sent < len(frames), "the server read every request although no answer was read"
        # in flight, plus the few answers the kernel's socket buffer took (and so released)
        assert handled < 2 * MAX_INFLIGHT_PER_CONNECTION, handled
        # and it is all still correct once the client reads: answers flow, reading resumes
        first = await raw.response()
        assert first.code == Code.OK and len(first.payload) == 65536
        await raw.stream.aclose()


# -- inline handlers (run by the connection's reader, answered with a direct write) -------------


def inline_echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


async def test_inline_unary_answers_and_reports_errors(sock_path: Path) -> None:
    """An inline handler answers like a task one: its reply, a TTRPCError's code, UNKNOWN for a
    bug (the server lives on), INVALID_ARGUMENT for a payload that does not parse."""

    def inc(req: status_pb2.Status, ctx: CallContext) -> status_pb2.Status:
        if req.code < 0:
            raise TTRPCError(Code.NOT_FOUND, "negative")
        if req.code == 99:
            raise RuntimeError("boom")
        return status_pb2.Status(code=req.code + 1, message=ctx.metadata["k"][0])

    server = Server()
    server.register_unary_inline(SVC, "Inc", status_pb2.Status, inc)
    with pytest.raises(ValueError):
        server.register(SVC, "Inc", echo)  # one name, one handler, whichever kind
    async with running(server, sock_path), open_client(str(sock_path)) as client:

        async def call(code: int) -> status_pb2.Status:
            out = await client.call(SVC, "Inc", status_pb2.Status(code=code).SerializeToString(),
                                    metadata=[("k", "v")])
            return status_pb2.Status.FromString(out)

        assert await call(1) == status_pb2.Status(code=2, message="v")
        for code, want in ((-1, Code.NOT_FOUND), (99, Code.UNKNOWN)):
            with pytest.raises(TTRPCError) as info:
                await call(code)
            assert info.value.code == want
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Inc", b"\xff\xff\xff")
        assert info.value.code == Code.INVALID_ARGUMENT
        with pytest.raises(TTRPCError) as info:
            await client.call(SVC, "Nope", b"")
        assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")
        assert await call(5) == status_pb2.Status(code=6, message="v")


async def test_inline_request_is_answered_while_a_slow_handler_runs(sock_path: Path) -> None:
    """A slow task handler on the same connection does not hold up an inline answer."""
    release = trio.Event()

    async def slow(payload: bytes, ctx: CallContext) -> bytes:
        await release.wait()
        return payload

    server = Server()
    server.register(SVC, "Slow", slow)
    server.register_inline(SVC, "Fast", inline_echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        slow_id = await raw.request(SVC, "Slow", b"slow")
        fast_id = await raw.request(SVC, "Fast", b"fast")
        first = await raw.response()
        assert (first.stream_id, first.payload) == (fast_id, b"fast")
        release.set()
        second = await raw.response()
        assert (second.stream_id, second.payload) == (slow_id, b"slow")
        await raw.stream.aclose()


async def test_inline_answers_never_interleave_with_a_large_answer(sock_path: Path) -> None:
    """While a large answer is still being written (the client is not reading), inline answers
    wait their turn: every frame arrives whole and each request is answered once."""
    big = b"b" * (MAX_PAYLOAD - 1024)
    handed = trio.Event()

    async def large(payload: bytes, ctx: CallContext) -> bytes:
        handed.set()
        return big

    server = Server()
    server.register(SVC, "Large", large)
    server.register_inline(SVC, "Fast", inline_echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        large_id = await raw.request(SVC, "Large")
        await handed.wait()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the large write is stuck now
        fast_ids = {await raw.request(SVC, "Fast", b"%d" % i): b"%d" % i for i in range(20)}
        got = {}
        for _ in range(21):
            resp = await raw.response()
            assert resp.code == Code.OK
            got[resp.stream_id] = resp.payload
        assert got == {large_id: big, **fast_ids}
        await raw.stream.aclose()


async def test_inline_request_before_a_violation_is_answered_then_the_connection_closes(
    sock_path: Path,
) -> None:
    server = Server()
    server.register_inline(SVC, "Fast", inline_echo)
    async with running(server, sock_path):
        raw = await RawClient.connect(sock_path)
        _, first = raw.proto.send_request(SVC, "Fast", b"valid")
        await raw.stream.send_all(first + first)  # the same stream id again: a violation
        assert (await raw.response()).payload == b"valid"
        with trio.fail_after(5):
            assert await raw.stream.receive_some() == b""
        await raw.stream.aclose()


async def test_on_disconnect_after_each_closed_connection(sock_path: Path) -> None:
    """The shim gives memory back after disconnects (shim.daemon.giveback): the hook runs
    once per accepted connection, after it is closed, not while it is open."""
    server = Server()
    server.register(SVC, "Echo", echo)
    closed: list[int] = []
    server.on_disconnect = lambda: closed.append(1)
    async with running(server, sock_path):
        clients = [await RawClient.connect(sock_path) for _ in range(3)]
        await clients[0].request(SVC, "Echo", b"x")
        assert (await clients[0].response()).payload == b"x"
        await trio.testing.wait_all_tasks_blocked()
        assert closed == []
        for c in clients:
            await c.stream.aclose()
        with trio.fail_after(5):
            while len(closed) < 3:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert len(closed) == 3
