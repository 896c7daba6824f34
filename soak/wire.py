"""Raw ttrpc over a blocking unix socket, for the checks that act as a (bad) client.

The stuck, hostile and fuzz checks need what a well-behaved client never does (hold a
connection idle, pipeline without reading, send broken frames) and a plain timed State probe
next to it, from threads, without an event loop. Frames are built and parsed with the shim's
own sans-IO codec (``shim.ttrpc.codec``): 10-byte header (length, stream id, type, flags),
then a ``ttrpc.Request`` / ``ttrpc.Response`` protobuf.
"""

from __future__ import annotations

import socket
import time

from shim.proto import shim_pb2, ttrpc_pb2
from shim.ttrpc.codec import Frame, FrameDecoder, FrameType, encode_frame

TASK = "containerd.task.v2.Task"
NS_HEADER = "containerd-namespace-ttrpc"
TIMEOUT_CODE = -1  # no answer in time
CLOSED_CODE = -2  # the shim closed the connection


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def request(stream_id: int, method: str, payload: bytes, namespace: str, service: str = TASK,
            timeout_nano: int = 0) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    req.metadata.add(key=NS_HEADER, value=namespace)
    return encode_frame(stream_id, FrameType.REQUEST, req.SerializeToString())


def read_responses(sock: socket.socket, decoder: FrameDecoder, want: int, timeout: float) -> tuple[list[int], bool]:
    """Status codes of up to ``want`` responses read within ``timeout``; and whether the peer closed."""
    codes: list[int] = []
    deadline = time.monotonic() + timeout
    while len(codes) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            return codes, False
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            return codes, False
        except OSError:
            return codes, True
        if not data:
            return codes, True
        for f in decoder.feed(data):
            if isinstance(f, Frame) and f.type == FrameType.RESPONSE:
                codes.append(ttrpc_pb2.Response.FromString(f.payload).status.code)
    return codes, False


def state(path: str, task: str, namespace: str, timeout: float = 5.0) -> tuple[int, float]:
    """One State call on a fresh connection: (status code or TIMEOUT/CLOSED, seconds)."""
    t0 = time.perf_counter()
    try:
        with connect(path, timeout) as s:
            s.sendall(request(1, "State", shim_pb2.StateRequest(id=task).SerializeToString(), namespace))
            codes, closed = read_responses(s, FrameDecoder(), 1, timeout)
    except OSError:
        return CLOSED_CODE, time.perf_counter() - t0
    code = codes[0] if codes else (CLOSED_CODE if closed else TIMEOUT_CODE)
    return code, time.perf_counter() - t0
