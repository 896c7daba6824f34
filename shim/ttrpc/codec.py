"""Sans-IO ttrpc v1.1: framing plus per-connection state machines.

Nothing here touches sockets or trio: callers feed received bytes in and get
events out, and get bytes back to write. That keeps the wire rules (which
mirror containerd/ttrpc's channel.go and server.go) testable byte by byte and
independent of the transport.

Frame layout: 10-byte header -- payload length (u32 BE, payload only), stream
id (u32 BE), type (u8), flags (u8) -- followed by the payload.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from google.protobuf.message import DecodeError

from shim.common.wire import bytes_field, varint
from shim.proto import ttrpc_pb2

from .errors import Code, ProtocolError, TTRPCError

HEADER_SIZE = 10
MAX_PAYLOAD = 4 << 20
_HEADER = struct.Struct(">IIBB")
_MAX_STREAM_ID = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    """Message types. DATA exists only in ttrpc >= 1.2 (streaming), which we
    do not implement; it is still a known value so it is ignored, not fatal."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """Header flags (ttrpc >= 1.2 streaming); v1.1 peers send 0 and ignore them."""

    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


#: raw type byte -> FrameType: a dict lookup, not an enum call, per frame.
_FRAME_TYPES = {t.value: t for t in FrameType}

# The frames and events below are NamedTuples: immutable values, built a few times per
# request on the hot path, where a frozen dataclass's __init__ costs several times more.


class Frame(NamedTuple):
    stream_id: int
    type: FrameType
    flags: int
    payload: bytes


class OversizeFrame(NamedTuple):
    """A frame whose payload exceeded MAX_PAYLOAD; its bytes were skipped.

    Go answers these with ResourceExhausted on that stream and keeps the
    connection, so the decoder reports it rather than failing."""

    stream_id: int
    type: FrameType
    length: int


def oversize_message(length: int) -> str:
    """The status text Go's channel.recv uses, so logs/errors look the same."""
    return f"message length {length} exceed maximum message size of {MAX_PAYLOAD}"


def encode_frame(stream_id: int, type: int, payload: bytes, flags: int = 0) -> bytes:
    """Header + payload. Raises ValueError if the payload is over MAX_PAYLOAD
    (the peer would reject it anyway) or a header field is out of range."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(oversize_message(len(payload)))
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    if not 0 <= flags <= 0xFF:
        raise ValueError(f"flags {flags} out of range")
    if type not in _FRAME_TYPES:
        raise ValueError(f"{type} is not a valid FrameType")
    return _HEADER.pack(len(payload), stream_id, type, flags) + payload


class FrameDecoder:
    """Incremental frame parser: accepts arbitrary chunks (split or merged
    frames). Oversize payloads are skipped as they arrive, never buffered.

    A frame of a type this version does not know is skipped whole, as Go's
    ttrpc does ("ignore for future compat"): the frames around it still count.
    One that also claims more than MAX_PAYLOAD bytes is not a future frame but
    a peer not speaking ttrpc (an HTTP or gRPC preface): ``feed`` returns the
    frames before it and sets ``error``, and the next ``feed`` raises it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self.error: ProtocolError | None = None

    def feed(self, data: bytes | bytearray) -> list[Frame | OversizeFrame]:
        if self.error is not None:
            raise self.error
        out: list[Frame | OversizeFrame] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:  # nothing left over (the usual case): frames are cut from the chunk itself
            buf = data
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length, stream_id, raw_type, flags = _HEADER.unpack_from(buf, pos)
            ftype = _FRAME_TYPES.get(raw_type)
            if ftype is None and length > MAX_PAYLOAD:
                self.error = ProtocolError(f"unknown frame type {raw_type:#x} of {length} bytes: not ttrpc")
                break
            if ftype is None:  # a later version's frame: skipped whole
                pos += HEADER_SIZE
                n = min(length, len(buf) - pos)
                pos += n
                self._skip = length - n
                if self._skip:
                    break
                continue
            if length > MAX_PAYLOAD:
                pos += HEADER_SIZE
                n = min(length, len(buf) - pos)
                pos += n
                self._skip = length - n
                out.append(OversizeFrame(stream_id, ftype, length))
                continue
            end = pos + HEADER_SIZE + length
            if end > len(buf):
                break
            out.append(Frame(stream_id, ftype, flags, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if buf is self._buf:
            del buf[:pos]
        elif pos < len(buf):
            self._buf += buf[pos:]
        return out


# --- events ---------------------------------------------------------------


class RequestReceived(NamedTuple):
    stream_id: int
    request: ttrpc_pb2.Request


class RequestRejected(NamedTuple):
    """A request the connection answers with an error status by itself (Go
    does the same); the transport just sends ``send_response(stream_id,
    code, message)``. The connection stays usable."""

    stream_id: int
    code: Code
    message: str


class ResponseReceived(NamedTuple):
    stream_id: int
    code: Code
    message: str
    payload: bytes


ServerEvent = RequestReceived | RequestRejected


# --- server side ----------------------------------------------------------


class ServerConnection:
    """Server half of one ttrpc connection.

    Follows containerd/ttrpc server.go: oversize or undecodable requests and
    even stream ids get an error status on that stream; response/data frames
    and frames of unknown types sent to a server are ignored (Go: "ignore for
    future compat"). Beyond Go, a request id that does not increase is a
    protocol violation: answering it could hand the client two responses for
    one stream. The requests before it are still returned (and answered by
    the transport before it closes the connection: nothing valid is lost);
    ``violation`` says what happened, and a later ``receive_data`` raises it.
    """

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._last_id = 0
        self._open: set[int] = set()
        self.violation: ProtocolError | None = None

    def receive_data(self, data: bytes | bytearray) -> list[ServerEvent]:
        if self.violation is not None:
            raise self.violation
        events: list[ServerEvent] = []
        for frame in self._decoder.feed(data):
            if frame.type != FrameType.REQUEST:
                continue
            try:
                event = self._on_request_frame(frame)
            except ProtocolError as exc:
                self.violation = exc
                break
            self._open.add(event.stream_id)
            events.append(event)
        if self.violation is None and self._decoder.error is not None:
            self.violation = self._decoder.error
        return events

    def _on_request_frame(self, frame: Frame | OversizeFrame) -> ServerEvent:
        sid = frame.stream_id
        if sid % 2 == 1:
            if sid <= self._last_id:
                raise ProtocolError(f"stream id {sid} not greater than last id {self._last_id}")
            self._last_id = sid
        elif sid in self._open:
            raise ProtocolError(f"stream id {sid} reused while in flight")
        if isinstance(frame, OversizeFrame):
            return RequestRejected(sid, Code.RESOURCE_EXHAUSTED, oversize_message(frame.length))
        try:
            request = ttrpc_pb2.Request.FromString(frame.payload)
        except DecodeError as exc:
            return RequestRejected(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        if sid % 2 != 1:
            return RequestRejected(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        return RequestReceived(sid, request)

    def send_response(
        self, stream_id: int, code: int = 0, message: str = "", payload: bytes = b""
    ) -> bytes:
        """Bytes answering ``stream_id``; each stream is answered once.

        A response too big for the wire becomes ResourceExhausted, so the
        client gets an error instead of a frame it would discard."""
        if stream_id not in self._open:
            raise ValueError(f"stream {stream_id} has no outstanding request")
        body = _encode_response(code, message, payload)
        if len(body) > MAX_PAYLOAD:
            body = _encode_response(Code.RESOURCE_EXHAUSTED, oversize_message(len(body)), b"")
        self._open.discard(stream_id)
        return encode_frame(stream_id, FrameType.RESPONSE, body)


def _encode_response(code: int, message: str, payload: bytes) -> bytes:
    """ttrpc.Response{status=1: Status{code=1, message=2}, payload=2}, encoded by hand (one per
    request, so no message objects): the bytes protobuf writes, Status present even when OK
    (as Go sends it). Tests compare them with the generated class."""
    status = (varint(8) + varint(code) if code else b"") + bytes_field(2, message.encode())
    return b"\x0a" + varint(len(status)) + status + bytes_field(2, payload)


# --- client side ----------------------------------------------------------


class ClientConnection:
    """Client half of one ttrpc connection: odd stream ids 1, 3, 5, ...

    A stream stays pending until its response arrives, even if the caller
    gave up, so a late answer is still recognised rather than treated as a
    protocol violation."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._pending: set[int] = set()

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: list[tuple[str, str]] | None = None,
        timeout_nano: int = 0,
    ) -> tuple[int, bytes]:
        """Allocate a stream id and encode the request frame.

        Raises TTRPCError(RESOURCE_EXHAUSTED) if the request is too large;
        no stream id is consumed then."""
        req = ttrpc_pb2.Request(
            service=service, method=method, payload=payload, timeout_nano=timeout_nano
        )
        for key, value in metadata or ():
            req.metadata.add(key=key, value=value)
        body = req.SerializeToString()
        if len(body) > MAX_PAYLOAD:
            raise TTRPCError(Code.RESOURCE_EXHAUSTED, oversize_message(len(body)))
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted; open a new connection")
        self._next_id += 2
        self._pending.add(sid)
        return sid, encode_frame(sid, FrameType.REQUEST, body)

    def receive_data(self, data: bytes | bytearray) -> list[ResponseReceived]:
        events: list[ResponseReceived] = []
        frames = self._decoder.feed(data)
        if self._decoder.error is not None:
            raise self._decoder.error
        for frame in frames:
            if frame.type != FrameType.RESPONSE:
                raise ProtocolError(f"unexpected {frame.type.name} frame from server")
            sid = frame.stream_id
            if sid not in self._pending:
                raise ProtocolError(f"response for unknown stream {sid}")
            self._pending.discard(sid)
            if isinstance(frame, OversizeFrame):
                events.append(
                    ResponseReceived(sid, Code.RESOURCE_EXHAUSTED, oversize_message(frame.length), b"")
                )
                continue
            try:
                resp = ttrpc_pb2.Response.FromString(frame.payload)
            except DecodeError as exc:
                # Only this call is affected; framing is intact.
                events.append(
                    ResponseReceived(sid, Code.INTERNAL, f"unmarshal response error: {exc}", b"")
                )
                continue
            events.append(
                ResponseReceived(
                    sid, Code.coerce(resp.status.code), resp.status.message, resp.payload
                )
            )
        return events
