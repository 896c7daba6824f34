"""trio transport for the ttrpc client.

One background reader task routes responses to waiting calls by stream id.
trio forbids orphan tasks, so the reader lives in a nursery the client owns
while it is used as an async context manager (``open_client`` or
``async with await Client.connect(path)``).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Self

import trio

from .codec import ClientConnection, ResponseReceived
from .errors import Code, TTRPCError

_READ_SIZE = 64 * 1024


def _socket_path(path: str) -> str:
    """containerd writes shim addresses as ``unix:///path``; accept both forms."""
    return path.removeprefix("unix://")


class _Call:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: ResponseReceived | None = None


class Client:
    """A ttrpc connection; safe for concurrent calls from many tasks."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._proto = ClientConnection()
        self._calls: dict[int, _Call] = {}
        self._send_lock = trio.Lock()
        self._error: str | None = None  # why the connection is unusable
        self._stack: AsyncExitStack | None = None
        self._reader_scope: trio.CancelScope | None = None

    @classmethod
    async def connect(cls, path: str) -> Client:
        """Connect to a unix socket. The result must be entered with
        ``async with`` before calls are made (that starts the reader)."""
        stream = await trio.open_unix_socket(_socket_path(path))
        return cls(stream)

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("Client already entered")
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        self._reader_scope = await nursery.start(self._reader)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The body's exception is deliberately not fed to the nursery: trio
        # would wrap it in an ExceptionGroup, and callers expect a plain
        # TTRPCError/ConnectionError to come out of the block.
        assert self._stack is not None
        try:
            await self.aclose()
        finally:
            await self._stack.aclose()

    async def aclose(self) -> None:
        """Close the connection; pending and later calls get ConnectionError."""
        self._fail("ttrpc: client closed")
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        await trio.aclose_forcefully(self._stream)

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: list[tuple[str, str]] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One unary call. Non-OK status -> TTRPCError; broken connection ->
        ConnectionError. ``timeout`` is sent to the server (timeout_nano) and
        also enforced locally, both ending in DEADLINE_EXCEEDED."""
        if self._reader_scope is None:
            raise RuntimeError("use 'async with' on the Client (or open_client) before calling")
        self._check_open()
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            timeout_nano = max(1, int(timeout * 1e9))
        deadline = math.inf if timeout is None else trio.current_time() + timeout

        stream_id, data = self._proto.send_request(
            service, method, payload, metadata=metadata, timeout_nano=timeout_nano
        )
        call = self._calls[stream_id] = _Call()
        try:
            await self._send(data)
            with trio.move_on_at(deadline):
                await call.done.wait()
        finally:
            self._calls.pop(stream_id, None)
        resp = call.response
        if resp is None:
            self._check_open()
            raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        if resp.code != Code.OK:
            raise TTRPCError(resp.code, resp.message)
        return resp.payload

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            self._check_open()
            # Raise a pending cancel *before* writing: a Cancelled out of
            # send_all itself may leave half a frame on the wire.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"ttrpc: connection lost: {exc!r}")
                raise ConnectionError(self._error) from exc
            except trio.Cancelled:
                self._fail("ttrpc: send interrupted, connection unusable")
                await trio.aclose_forcefully(self._stream)
                raise

    async def _reader(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """Route responses to calls. Never raises (a crash here would tear
        down the owner's nursery); every failure poisons the client instead."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                while True:
                    data = await self._stream.receive_some(_READ_SIZE)
                    if not data:
                        self._fail("ttrpc: connection closed by server")
                        return
                    for event in self._proto.receive_data(data):
                        call = self._calls.get(event.stream_id)
                        if call is not None:  # else the caller gave up; drop it
                            call.response = event
                            call.done.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"ttrpc: connection lost: {exc!r}")
            except Exception as exc:  # noqa: BLE001 - ProtocolError, or a bug
                self._fail(f"ttrpc: bad data from server: {exc}")
                await trio.aclose_forcefully(self._stream)

    def _check_open(self) -> None:
        if self._error is not None:
            raise ConnectionError(self._error)

    def _fail(self, reason: str) -> None:
        """Poison the client once and wake every waiting call."""
        if self._error is None:
            self._error = reason
        for call in self._calls.values():
            call.done.set()


@asynccontextmanager
async def open_client(path: str) -> AsyncIterator[Client]:
    """Connect and run the reader task for the duration of the block."""
    client = await Client.connect(path)
    async with client:
        yield client
