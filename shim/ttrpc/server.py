"""trio transport for the ttrpc server: accept loop, one task per request.

All protocol decisions live in ``codec.ServerConnection``; this module only
moves bytes, runs handlers and turns their outcome into a status.

A handler registered as inline (a plain function: it cannot wait for
anything) is run by the connection's reader itself, and its answer is written
straight to the socket when nobody else is writing and the socket takes it
all: no task, no lock round trip, one scheduler pass per request instead of
about six (Task/State, which containerd and kubelet poll, is one).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from shim.proto import ttrpc_pb2

from .codec import RequestReceived, RequestRejected, ServerConnection
from .errors import Code, ProtocolError, TTRPCError

log = logging.getLogger("shim.ttrpc")

_READ_SIZE = 64 * 1024
#: Requests of one connection being handled or answered at once. Past it the
#: connection is not read until one is answered, so a client that pipelines
#: requests and never reads the responses holds a bounded amount of memory
#: (Go ttrpc stops reading such a client too).
MAX_INFLIGHT_PER_CONNECTION = 64
#: Connections served at once; more wait in the listen backlog. containerd
#: opens one per task, so a namespace shim serving hundreds of tasks stays far below.
MAX_CONNECTIONS = 4096
# accept() errors that mean "out of resources, try later" (Go backs off too).
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(slots=True)
class CallContext:
    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None  # trio.current_time() clock; None = no timeout


Handler = Callable[[bytes, CallContext], Awaitable[bytes]]
InlineHandler = Callable[[bytes, CallContext], bytes]
M = TypeVar("M", bound=Message)
Outcome = tuple[int, str, bytes]  # code, message, payload


def _same_user(sock: trio.socket.SocketType) -> bool:
    """SO_PEERCRED: the connecting process runs as our effective uid and gid."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, gid = struct.unpack("3i", creds)
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return True
    log.warning("ttrpc: refused a connection from uid %d gid %d (not the shim's user)", uid, gid)
    return False


class Server:
    """Dispatches ttrpc requests to registered coroutine handlers.

    ``close()`` is a graceful shutdown: no new connections or requests are
    read, but requests already read run to completion and are answered, since
    a half-done Kill/Delete that containerd never hears about is worse than a
    slow shutdown.
    """

    def __init__(self, *, require_same_user: bool = True) -> None:
        #: Like Go ttrpc's UnixSocketRequireSameUser: a peer whose uid and gid are not ours
        #: is disconnected unanswered, whatever the socket file's permissions let through.
        self.require_same_user = require_same_user
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._inline: dict[tuple[str, str], InlineHandler] = {}
        self._services: set[str] = set()
        self._closed = False
        self._scopes: set[trio.CancelScope] = set()  # accept loops + readers
        self._listeners: set[trio.socket.SocketType] = set()
        self._connection_slots = trio.Semaphore(MAX_CONNECTIONS)
        #: Called (in the loop) after each accepted connection is closed.
        self.on_disconnect: Callable[[], None] | None = None

    # -- registration ------------------------------------------------------

    def register(self, service: str, method: str, handler: Handler) -> None:
        self._claim(service, method)
        self._handlers[(service, method)] = handler

    def register_inline(self, service: str, method: str, handler: InlineHandler) -> None:
        """A handler the connection's reader runs itself, without a task.

        Only for work that never waits (no I/O, no locks, no await): while it
        runs, nothing else on the connection is read."""
        self._claim(service, method)
        self._inline[(service, method)] = handler

    def _claim(self, service: str, method: str) -> None:
        if (service, method) in self._handlers or (service, method) in self._inline:
            raise ValueError(f"duplicate method /{service}/{method}")
        self._services.add(service)

    def register_unary(
        self,
        service: str,
        method: str,
        request_type: type[M],
        handler: Callable[[M, CallContext], Awaitable[Message]],
    ) -> None:
        """Register a handler working on protobuf messages instead of bytes."""

        async def raw(payload: bytes, ctx: CallContext) -> bytes:
            return _serialized(await handler(_parse(request_type, payload), ctx))

        self.register(service, method, raw)

    def register_unary_inline(
        self,
        service: str,
        method: str,
        request_type: type[M],
        handler: Callable[[M, CallContext], Message | bytes],
    ) -> None:
        """``register_unary`` for a plain function run inline (see ``register_inline``); it may
        answer with the reply already serialized (one it keeps from an earlier call)."""

        def raw(payload: bytes, ctx: CallContext) -> bytes:
            return _serialized(handler(_parse(request_type, payload), ctx))

        self.register_inline(service, method, raw)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Stop accepting and reading; in-flight handlers finish and answer."""
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()
        # Close listening sockets now, not when serve() returns, so new
        # connects are refused instead of parked in the backlog meanwhile.
        for sock in list(self._listeners):
            sock.close()

    async def serve(
        self,
        listener_sock: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on a bound, listening socket until cancelled or
        ``close()``; returns once every connection has finished. The
        listening socket is closed by ``close()`` or on return, like Go's
        Server.Serve/Shutdown."""
        listener = trio.SocketListener(listener_sock)
        self._listeners.add(listener_sock)
        try:
            async with trio.open_nursery() as conns:
                with self._track(trio.CancelScope()) as scope:
                    task_status.started()
                    if self._closed:
                        scope.cancel()
                    backoff = 0.0
                    while True:
                        await self._connection_slots.acquire()
                        try:
                            stream = await listener.accept()
                        except trio.ClosedResourceError:
                            self._connection_slots.release()
                            if self._closed:
                                break
                            raise
                        except OSError as exc:
                            self._connection_slots.release()
                            if exc.errno not in _ACCEPT_RETRY:
                                raise
                            backoff = min(max(backoff * 2, 0.001), 1.0)
                            log.error("ttrpc: failed accept; backoff %.3fs: %s", backoff, exc)
                            await trio.sleep(backoff)
                            continue
                        backoff = 0.0
                        if self.require_same_user and not _same_user(stream.socket):
                            self._connection_slots.release()
                            await trio.aclose_forcefully(stream)
                            continue
                        conns.start_soon(self._serve_counted, stream)
        finally:
            self._listeners.discard(listener_sock)
            await trio.aclose_forcefully(listener)

    async def _serve_counted(self, stream: trio.abc.Stream) -> None:
        try:
            await self.serve_stream(stream)
        finally:
            self._connection_slots.release()
            if self.on_disconnect is not None:
                self.on_disconnect()

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until EOF, a protocol error, or ``close()``.

        Handlers live in a nursery owned by this connection. If the peer
        goes away they still run to completion (their answers are dropped)."""
        conn = _Connection(self, stream)
        peer_gone = False
        try:
            async with trio.open_nursery() as handlers:
                with self._track(trio.CancelScope()) as scope:
                    if self._closed:
                        scope.cancel()
                    peer_gone = await conn.read_loop(handlers)
                if peer_gone:
                    conn.dead = True
                    await trio.aclose_forcefully(stream)
        finally:
            await trio.aclose_forcefully(stream)

    def _track(self, scope: trio.CancelScope) -> _Tracked:
        return _Tracked(self._scopes, scope)

    # -- dispatch ----------------------------------------------------------

    def inline_outcome(self, event: RequestReceived) -> Outcome | None:
        """The answer to a request for an inline handler (or none at all), computed now;
        None when the request needs a task (``dispatch``)."""
        req = event.request
        key = (req.service, req.method)
        if key in self._handlers:
            return None
        ctx = _context(req, *key)
        inline = self._inline.get(key)
        if inline is None:
            return self._unimplemented(ctx)
        # A deadline can only pass at an await, and an inline handler has none:
        # like a task handler that never reaches a checkpoint, it answers.
        try:
            return self._outcome(ctx, inline(req.payload, ctx))
        except Exception as exc:  # noqa: BLE001 - as in dispatch
            return self._failure(ctx, exc)

    async def dispatch(self, conn: _Connection, event: RequestReceived) -> None:
        req = event.request
        ctx = _context(req, req.service, req.method)
        code, message, payload = await self._run_handler(ctx, req.payload)
        await conn.respond(event.stream_id, code, message, payload)

    def _unimplemented(self, ctx: CallContext) -> Outcome:
        if ctx.service not in self._services:
            return Code.UNIMPLEMENTED, f"service {ctx.service}", b""
        return Code.UNIMPLEMENTED, f"method {ctx.method}", b""

    async def _run_handler(self, ctx: CallContext, payload: bytes) -> Outcome:
        handler = self._handlers.get((ctx.service, ctx.method))
        if handler is None:
            return self._unimplemented(ctx)
        try:
            with trio.CancelScope(
                deadline=math.inf if ctx.deadline is None else ctx.deadline
            ) as scope:
                reply = await handler(payload, ctx)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not take the server down
            return self._failure(ctx, exc)
        if scope.cancelled_caught:
            return Code.DEADLINE_EXCEEDED, "context deadline exceeded", b""
        return self._outcome(ctx, reply)

    @staticmethod
    def _failure(ctx: CallContext, exc: Exception) -> Outcome:
        if isinstance(exc, TTRPCError):
            return exc.code, exc.message, b""
        log.error("ttrpc: handler /%s/%s failed", ctx.service, ctx.method, exc_info=exc)
        return Code.UNKNOWN, str(exc), b""

    @staticmethod
    def _outcome(ctx: CallContext, reply: object) -> Outcome:
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            log.error("ttrpc: handler /%s/%s returned %r", ctx.service, ctx.method, type(reply))
            return Code.UNKNOWN, f"ttrpc: handler returned {type(reply).__name__}, not bytes", b""
        return Code.OK, "", bytes(reply)


def _context(req: ttrpc_pb2.Request, service: str, method: str) -> CallContext:
    metadata: dict[str, list[str]] = {}
    for kv in req.metadata:
        metadata.setdefault(kv.key, []).append(kv.value)
    # Go: any non-zero timeout (even negative = already expired) applies.
    timeout = req.timeout_nano
    deadline = trio.current_time() + timeout / 1e9 if timeout != 0 else None
    return CallContext(service, method, metadata, deadline)


def _parse(request_type: type[M], payload: bytes) -> M:
    try:
        return request_type.FromString(payload)
    except DecodeError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"ttrpc: error unmarshalling payload: {exc}") from exc


def _serialized(reply: Message | bytes) -> bytes:
    if isinstance(reply, bytes):
        return reply
    if not isinstance(reply, Message):
        raise TypeError(f"ttrpc: handler returned {type(reply).__name__}, not a message")
    return reply.SerializeToString()


class _Tracked:
    """Context manager keeping a cancel scope in the server's set while open,
    so ``close()`` can reach every accept loop and reader."""

    def __init__(self, scopes: set[trio.CancelScope], scope: trio.CancelScope) -> None:
        self._scopes, self._scope = scopes, scope

    def __enter__(self) -> trio.CancelScope:
        self._scopes.add(self._scope)
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._scopes.discard(self._scope)
        return self._scope.__exit__(exc_type, exc, tb)


class _Connection:
    """Per-connection state: protocol machine, write lock, liveness."""

    def __init__(self, server: Server, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.proto = ServerConnection()
        # A semaphore, not a trio.Lock: the reader may take it for a direct write
        # and hand the rest of that write to a task, which then releases it.
        self.send_lock = trio.Semaphore(1)
        self.dead = False
        self.slots = trio.Semaphore(MAX_INFLIGHT_PER_CONNECTION)
        # Direct writes need the socket; any other stream always goes through send_all.
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    async def read_loop(self, handlers: trio.Nursery) -> bool:
        """Read until told to stop; True if the peer is gone or misbehaved
        (close now), False on server shutdown (answer in-flight calls)."""
        while True:
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return True
            if not data:
                return True
            try:
                events = self.proto.receive_data(data)
            except ProtocolError as exc:
                log.warning("ttrpc: closing connection: %s", exc)
                return True
            for event in events:
                # Backpressure: past the limit, wait for an answer to go out first.
                try:
                    self.slots.acquire_nowait()
                except trio.WouldBlock:
                    await self.slots.acquire()
                if isinstance(event, RequestRejected):
                    self._answer_now(handlers, event.stream_id, (event.code, event.message, b""))
                    continue
                outcome = self.server.inline_outcome(event)
                if outcome is None:
                    handlers.start_soon(self._slotted, self.server.dispatch, self, event)
                else:
                    self._answer_now(handlers, event.stream_id, outcome)
            if self.proto.violation is not None:
                # The requests before the violation are answered (those still running
                # finish in the handlers' nursery), then the connection closes.
                log.warning("ttrpc: closing connection after answering: %s", self.proto.violation)
                return False

    async def _receive(self) -> bytes | bytearray:
        """The next bytes from the peer (b"" at EOF).

        On a socket: wait for readability first, then read(2) the fd. Between requests
        the socket is nearly always empty, so reading first (what ``receive_some``
        does) costs a failed recv and its exception per request, and its layers
        (error translation, try-sync checkpoints) are another few µs on the path of
        every answer. Waiting is a checkpoint either way."""
        if self.fd < 0:
            return await self.stream.receive_some(_READ_SIZE)
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                continue

    async def _slotted(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        finally:
            self.slots.release()

    def _answer_now(self, handlers: trio.Nursery, stream_id: int, outcome: Outcome) -> None:
        """Answer from the reader, holding one slot: written at once when the socket
        takes it, else (or for its rest) by a task that holds the slot until it is out."""
        data = self.proto.send_response(stream_id, *outcome)
        if self.dead:
            self.slots.release()
            return
        rest = self._write_now(data)
        if rest is None:  # another answer is being written: queue behind it
            handlers.start_soon(self._slotted, self._send, data, False)
        elif rest:
            handlers.start_soon(self._slotted, self._send, rest, True)
        else:
            self.slots.release()

    async def respond(self, stream_id: int, code: int, message: str, payload: bytes) -> None:
        data = self.proto.send_response(stream_id, code, message, payload)
        if self.dead:
            return
        rest = self._write_now(data)
        if rest is None:
            await self._send(data, False)
        elif rest:
            await self._send(rest, True)

    def _write_now(self, data: bytes) -> bytes | None:
        """Write what the socket takes right now, if nobody else is writing: what is left
        (b"" when all went out; otherwise the send lock stays held for the rest), or None
        when not tried (another answer is being written, or the stream is not a socket).
        An answer is one small frame that nearly always fits the socket buffer: written
        here it costs one syscall, where ``send_all`` adds a scheduler pass."""
        if self.fd < 0:
            return None
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            return None
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent, self.dead = len(data), True
        if sent < len(data):
            return data[sent:]
        self.send_lock.release()
        return b""

    async def _send(self, data: bytes, locked: bool) -> None:
        """Write data under the send lock (already held by us if ``locked``)."""
        if not locked:
            if self.dead:
                return
            await self.send_lock.acquire()
        try:
            if not self.dead:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dead = True
        finally:
            self.send_lock.release()
