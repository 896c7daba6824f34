"""Pure tests of the sans-IO ttrpc layer: bytes in, events out."""

from __future__ import annotations

import struct

import pytest

from shim.proto import ttrpc_pb2
from shim.ttrpc.codec import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    ClientConnection,
    Frame,
    FrameDecoder,
    FrameType,
    OversizeFrame,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    ServerConnection,
    encode_frame,
)
from shim.ttrpc.errors import Code, ProtocolError, TTRPCError


def request_frame(stream_id: int, service: str = "svc", method: str = "M", payload: bytes = b"") -> bytes:
    body = ttrpc_pb2.Request(service=service, method=method, payload=payload).SerializeToString()
    return encode_frame(stream_id, FrameType.REQUEST, body)


def raw_header(length: int, stream_id: int, type_: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream_id, type_, flags)


# --- framing ---------------------------------------------------------------


def test_header_layout_matches_go() -> None:
    data = encode_frame(0x01020304, FrameType.RESPONSE, b"abc", flags=4)
    assert len(data) == HEADER_SIZE + 3
    assert data[:HEADER_SIZE] == b"\x00\x00\x00\x03\x01\x02\x03\x04\x02\x04"
    assert data[HEADER_SIZE:] == b"abc"


def test_roundtrip() -> None:
    frames = FrameDecoder().feed(encode_frame(7, FrameType.REQUEST, b"hello", flags=2))
    assert frames == [Frame(7, FrameType.REQUEST, 2, b"hello")]


def test_empty_payload() -> None:
    assert FrameDecoder().feed(encode_frame(1, FrameType.REQUEST, b"")) == [
        Frame(1, FrameType.REQUEST, 0, b"")
    ]


def test_split_byte_by_byte() -> None:
    data = encode_frame(1, FrameType.REQUEST, b"x" * 50) + encode_frame(3, FrameType.REQUEST, b"y")
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == [Frame(1, FrameType.REQUEST, 0, b"x" * 50), Frame(3, FrameType.REQUEST, 0, b"y")]


def test_a_frame_and_the_start_of_the_next_in_one_chunk() -> None:
    dec = FrameDecoder()
    second = encode_frame(3, FrameType.REQUEST, b"second")
    assert dec.feed(encode_frame(1, FrameType.REQUEST, b"first") + second[:4]) == [
        Frame(1, FrameType.REQUEST, 0, b"first")
    ]
    assert dec.feed(second[4:12]) == []
    assert dec.feed(second[12:]) == [Frame(3, FrameType.REQUEST, 0, b"second")]
    assert dec.feed(encode_frame(5, FrameType.REQUEST, b"")) == [Frame(5, FrameType.REQUEST, 0, b"")]


def test_merged_frames() -> None:
    data = b"".join(encode_frame(i, FrameType.RESPONSE, bytes([i]) * i) for i in range(1, 6))
    out = FrameDecoder().feed(data)
    assert [f.stream_id for f in out] == [1, 2, 3, 4, 5]
    assert [f.payload for f in out] == [bytes([i]) * i for i in range(1, 6)]


def test_encode_oversize_raises() -> None:
    encode_frame(1, FrameType.REQUEST, b"\0" * MAX_PAYLOAD)  # exactly max is fine
    with pytest.raises(ValueError):
        encode_frame(1, FrameType.REQUEST, b"\0" * (MAX_PAYLOAD + 1))


def test_oversize_skipped_in_chunks_then_next_frame_decodes() -> None:
    length = MAX_PAYLOAD + 10
    dec = FrameDecoder()
    events = dec.feed(raw_header(length, 5, FrameType.REQUEST) + b"\0" * 100)
    assert events == [OversizeFrame(5, FrameType.REQUEST, length)]
    chunk = b"\0" * 65536
    remaining = length - 100
    while remaining > len(chunk):
        assert dec.feed(chunk) == []
        remaining -= len(chunk)
    assert len(dec._buf) == 0  # skipped, not buffered
    tail = b"\0" * remaining + encode_frame(7, FrameType.REQUEST, b"ok")
    assert dec.feed(tail) == [Frame(7, FrameType.REQUEST, 0, b"ok")]


def test_a_frame_of_unknown_type_is_skipped_as_go_does() -> None:
    """ttrpc's "ignore for future compat": the frames around it still count."""
    dec = FrameDecoder()
    unknown = raw_header(3, 5, 7) + b"abc"
    frames = dec.feed(encode_frame(1, FrameType.REQUEST, b"a") + unknown + encode_frame(3, FrameType.REQUEST, b"b"))
    assert frames == [Frame(1, FrameType.REQUEST, 0, b"a"), Frame(3, FrameType.REQUEST, 0, b"b")]
    assert dec.error is None
    assert dec.feed(raw_header(4, 9, 0x42) + b"ab") == []  # split: the rest is skipped when it comes
    assert dec.feed(b"cd" + encode_frame(5, FrameType.REQUEST, b"c")) == [Frame(5, FrameType.REQUEST, 0, b"c")]


def test_a_peer_not_speaking_ttrpc_is_an_error_after_the_frames_before_it() -> None:
    dec = FrameDecoder()
    frames = dec.feed(encode_frame(1, FrameType.REQUEST, b"a") + b"GET / HTTP/1.1\r\n\r\n")
    assert frames == [Frame(1, FrameType.REQUEST, 0, b"a")]  # what came before is kept
    assert isinstance(dec.error, ProtocolError)
    with pytest.raises(ProtocolError):  # sticky
        dec.feed(encode_frame(3, FrameType.REQUEST, b""))


# --- server connection -------------------------------------------------------


def test_server_receives_request() -> None:
    req = ttrpc_pb2.Request(service="s", method="m", payload=b"p", timeout_nano=5)
    req.metadata.add(key="k", value="v")
    conn = ServerConnection()
    [ev] = conn.receive_data(encode_frame(1, FrameType.REQUEST, req.SerializeToString()))
    assert isinstance(ev, RequestReceived)
    assert ev.stream_id == 1 and ev.request == req


def test_server_oversize_rejected_then_continues() -> None:
    conn = ServerConnection()
    length = MAX_PAYLOAD + 1
    data = raw_header(length, 1, FrameType.REQUEST) + b"\0" * length + request_frame(3)
    events = conn.receive_data(data)
    assert events[0] == RequestRejected(
        1, Code.RESOURCE_EXHAUSTED, f"message length {length} exceed maximum message size of {MAX_PAYLOAD}"
    )
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 3


def test_server_undecodable_payload_rejected() -> None:
    conn = ServerConnection()
    events = conn.receive_data(encode_frame(1, FrameType.REQUEST, b"\xff\xff\xff") + request_frame(3))
    assert isinstance(events[0], RequestRejected)
    assert events[0].stream_id == 1 and events[0].code == Code.INVALID_ARGUMENT
    assert isinstance(events[1], RequestReceived)


def test_server_even_stream_id_rejected_like_go() -> None:
    # server.go answers InvalidArgument on that stream and keeps the connection.
    conn = ServerConnection()
    [ev] = conn.receive_data(request_frame(2))
    assert ev == RequestRejected(2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
    assert isinstance(conn.receive_data(request_frame(1))[0], RequestReceived)


def test_server_even_stream_id_reused_in_flight_is_a_violation() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(2))
    assert conn.receive_data(request_frame(2)) == [] and isinstance(conn.violation, ProtocolError)
    with pytest.raises(ProtocolError):
        conn.receive_data(request_frame(5))


@pytest.mark.parametrize("second", [1, 3])
def test_server_non_increasing_stream_id_is_a_violation_after_the_valid_requests(second: int) -> None:
    """The valid requests that came in the same read are returned (the transport answers
    them, then closes): nothing valid is lost to a violation behind it."""
    conn = ServerConnection()
    events = conn.receive_data(request_frame(3) + request_frame(second) + request_frame(7))
    assert [e.stream_id for e in events] == [3]
    assert isinstance(conn.violation, ProtocolError)
    with pytest.raises(ProtocolError):
        conn.receive_data(request_frame(9))


def test_server_ignores_non_request_frames() -> None:
    conn = ServerConnection()
    data = encode_frame(1, FrameType.RESPONSE, b"x") + encode_frame(1, FrameType.DATA, b"y")
    assert conn.receive_data(data) == []


def test_server_unknown_frame_type_is_ignored_like_go() -> None:
    conn = ServerConnection()
    events = conn.receive_data(request_frame(1) + raw_header(0, 3, 7) + request_frame(3))
    assert [e.stream_id for e in events] == [1, 3] and conn.violation is None


def test_server_garbage_is_a_violation_after_the_valid_requests() -> None:
    conn = ServerConnection()
    events = conn.receive_data(request_frame(1) + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert [e.stream_id for e in events] == [1]
    assert isinstance(conn.violation, ProtocolError)


def test_send_response_encodes_status() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1) + request_frame(3))
    frames = FrameDecoder().feed(
        conn.send_response(1, payload=b"out") + conn.send_response(3, Code.NOT_FOUND, "nope")
    )
    assert [(f.stream_id, f.type) for f in frames] == [(1, FrameType.RESPONSE), (3, FrameType.RESPONSE)]
    ok = ttrpc_pb2.Response.FromString(frames[0].payload)
    assert ok.HasField("status") and ok.status.code == 0 and ok.payload == b"out"
    err = ttrpc_pb2.Response.FromString(frames[1].payload)
    assert (err.status.code, err.status.message) == (Code.NOT_FOUND, "nope")


@pytest.mark.parametrize(
    ("code", "message", "payload"),
    [(Code.OK, "", b""), (Code.OK, "", b"x" * 300), (Code.NOT_FOUND, "nope", b""),
     (Code.UNKNOWN, "ü" * 100, b"p"), (-1, "", b"")],
)
def test_response_bytes_are_what_protobuf_writes(code: int, message: str, payload: bytes) -> None:
    """The response is encoded by hand: byte for byte the generated class's, Status always set."""
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    [frame] = FrameDecoder().feed(conn.send_response(1, code, message, payload))
    expected = ttrpc_pb2.Response(payload=payload)
    expected.status.SetInParent()
    expected.status.code, expected.status.message = code, message
    assert frame.payload == expected.SerializeToString()


def test_send_response_only_once_per_stream() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    conn.send_response(1)
    with pytest.raises(ValueError):
        conn.send_response(1)


def test_send_response_too_large_becomes_resource_exhausted() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    [frame] = FrameDecoder().feed(conn.send_response(1, payload=b"\0" * MAX_PAYLOAD))
    resp = ttrpc_pb2.Response.FromString(frame.payload)
    assert resp.status.code == Code.RESOURCE_EXHAUSTED and resp.payload == b""


# --- client connection -------------------------------------------------------


def test_client_stream_ids_are_odd_and_increasing() -> None:
    client = ClientConnection()
    ids = [client.send_request("s", "m", b"")[0] for _ in range(3)]
    assert ids == [1, 3, 5]


def test_client_request_encoding() -> None:
    client = ClientConnection()
    sid, data = client.send_request(
        "svc", "Meth", b"pl", metadata=[("a", "1"), ("a", "2")], timeout_nano=99
    )
    [frame] = FrameDecoder().feed(data)
    assert frame.stream_id == sid and frame.type == FrameType.REQUEST
    req = ttrpc_pb2.Request.FromString(frame.payload)
    assert (req.service, req.method, req.payload, req.timeout_nano) == ("svc", "Meth", b"pl", 99)
    assert [(kv.key, kv.value) for kv in req.metadata] == [("a", "1"), ("a", "2")]


def test_client_request_too_large() -> None:
    client = ClientConnection()
    with pytest.raises(TTRPCError) as info:
        client.send_request("s", "m", b"\0" * MAX_PAYLOAD)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert client.send_request("s", "m", b"")[0] == 1  # no id consumed


def test_client_server_roundtrip_out_of_order() -> None:
    client, server = ClientConnection(), ServerConnection()
    id1, d1 = client.send_request("s", "a", b"1")
    id2, d2 = client.send_request("s", "b", b"2")
    reqs = server.receive_data(d1 + d2)
    assert [r.request.method for r in reqs if isinstance(r, RequestReceived)] == ["a", "b"]
    out = server.send_response(id2, Code.ALREADY_EXISTS, "dup") + server.send_response(id1, payload=b"r1")
    assert client.receive_data(out) == [
        ResponseReceived(id2, Code.ALREADY_EXISTS, "dup", b""),
        ResponseReceived(id1, Code.OK, "", b"r1"),
    ]


def test_client_response_to_unknown_stream_is_protocol_error() -> None:
    client = ClientConnection()
    client.send_request("s", "m", b"")
    resp = ttrpc_pb2.Response(payload=b"").SerializeToString()
    with pytest.raises(ProtocolError):
        client.receive_data(encode_frame(3, FrameType.RESPONSE, resp))


def test_client_duplicate_response_is_protocol_error() -> None:
    client = ClientConnection()
    sid, _ = client.send_request("s", "m", b"")
    resp = encode_frame(sid, FrameType.RESPONSE, ttrpc_pb2.Response().SerializeToString())
    assert client.receive_data(resp)[0].code == Code.OK  # missing status means OK
    with pytest.raises(ProtocolError):
        client.receive_data(resp)


def test_client_request_frame_from_server_is_protocol_error() -> None:
    client = ClientConnection()
    client.send_request("s", "m", b"")
    with pytest.raises(ProtocolError):
        client.receive_data(request_frame(1))


def test_client_oversize_response_fails_only_that_call() -> None:
    client = ClientConnection()
    sid1, _ = client.send_request("s", "m", b"")
    sid3, _ = client.send_request("s", "m", b"")
    length = MAX_PAYLOAD + 1
    ok = encode_frame(sid3, FrameType.RESPONSE, ttrpc_pb2.Response(payload=b"y").SerializeToString())
    events = client.receive_data(raw_header(length, sid1, FrameType.RESPONSE) + b"\0" * length + ok)
    assert events[0].stream_id == sid1 and events[0].code == Code.RESOURCE_EXHAUSTED
    assert events[1] == ResponseReceived(sid3, Code.OK, "", b"y")


def test_client_unknown_status_code_maps_to_unknown() -> None:
    client = ClientConnection()
    sid, _ = client.send_request("s", "m", b"")
    resp = ttrpc_pb2.Response()
    resp.status.code = 99
    resp.status.message = "weird"
    [ev] = client.receive_data(encode_frame(sid, FrameType.RESPONSE, resp.SerializeToString()))
    assert (ev.code, ev.message) == (Code.UNKNOWN, "weird")
