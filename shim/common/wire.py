"""Just enough protobuf for the lean paths (start, delete): encode and decode by hand.

Importing google.protobuf and a generated module costs ~30 ms per process;
``start`` and ``delete`` run once per container, so the few small messages
they write are encoded here by hand. Tests check the bytes against the
generated classes.
"""

from __future__ import annotations

#: The runtime options' type names (an Any's type URL, which containerd's typeurl writes bare):
#: here, not in shim.common.options, so ``start`` reads them without importing that module.
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


def type_name(type_url: str) -> str:
    """The message name of a type URL, with or without a ``type.googleapis.com/`` prefix."""
    return type_url.rsplit("/", 1)[-1]


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


# -- decoding ------------------------------------------------------------------


class Malformed(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if i - pos == 9 and b > 1:
                raise Malformed("varint overflows 64 bits")
            return value, i + 1
        shift += 7
    raise Malformed("truncated or over-long varint")


def _skip(buf: bytes, pos: int, wire: int) -> int:
    """Position after one field value of wire type ``wire`` (not a group)."""
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire in (1, 5):
        end = pos + (8 if wire == 1 else 4)
    elif wire == 2:
        length, pos = _varint(buf, pos)
        end = pos + length
    else:
        raise Malformed(f"invalid wire type {wire}")
    if end > len(buf):
        raise Malformed("truncated field")
    return end


def _key(buf: bytes, pos: int) -> tuple[int, int, int]:
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if number == 0 or number > 0x1FFFFFFF:
        raise Malformed("invalid field number")
    return number, wire, pos


def _skip_group(buf: bytes, pos: int, number: int) -> int:
    """Position after the (unknown) group ``number`` that starts at ``pos``."""
    open_groups = [number]
    while open_groups:
        if pos >= len(buf):
            raise Malformed("unterminated group")
        number, wire, pos = _key(buf, pos)
        if wire == 3:
            open_groups.append(number)
        elif wire == 4:
            if open_groups.pop() != number:
                raise Malformed("mismatched end group")
        else:
            pos = _skip(buf, pos, wire)
    return pos


def fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """The fields of one message: [(number, wire type, int | bytes)], groups skipped.

    Fails where protobuf's decoders fail: bad wire type, field number 0,
    truncation, unbalanced groups.
    """
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        number, wire, pos = _key(buf, pos)
        if wire == 3:
            pos = _skip_group(buf, pos, number)
            continue
        if wire == 4:
            raise Malformed("end group outside a group")
        if wire == 2:
            length, start = _varint(buf, pos)
            pos = start + length
            if pos > len(buf):
                raise Malformed("truncated field")
            value: int | bytes = buf[start:pos]
        elif wire == 0:
            value, pos = _varint(buf, pos)
        else:
            start, pos = pos, _skip(buf, pos, wire)
            value = int.from_bytes(buf[start:pos], "little")
        out.append((number, wire, value))
    return out


def text(value: int | bytes) -> str:
    try:
        return bytes(value).decode("utf-8")  # proto3 strings must be valid UTF-8
    except UnicodeDecodeError:
        raise Malformed("string field is not valid UTF-8") from None
