"""Just enough protobuf encoding for the lean paths (start, delete).

Importing google.protobuf and a generated module costs ~30 ms per process;
``start`` and ``delete`` run once per container, so the few small messages
they write are encoded here by hand. Tests check the bytes against the
generated classes.
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are ten-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint field; proto3 omits zero."""
    return varint(number << 3) + varint(value) if value else b""


def bytes_field(number: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, message); proto3 omits empty."""
    return varint(number << 3 | 2) + varint(len(data)) + data if data else b""


def timestamp(ns: int) -> bytes:
    """google.protobuf.Timestamp{seconds=1, nanos=2} for nanoseconds since the epoch."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return varint_field(1, seconds) + varint_field(2, nanos)


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3}."""
    return varint_field(1, pid) + varint_field(2, exit_status) + bytes_field(3, timestamp(exited_at_ns))
