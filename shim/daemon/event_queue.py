"""The shim's outgoing event queue: FIFO, never drops, bounded in memory.

While containerd is away (restarting, overloaded) a busy shim keeps producing
events; a namespace shim serving hundreds of tasks could grow without bound.
The first ``memory_limit`` events wait in memory; after that, events are
serialized into an in-memory chunk that a background task writes to an
unnamed file (``flush``, in a worker thread), and the head of the queue is
refilled from that file (``refill``) as events leave. Order is kept: once
anything is spilled, every newer event goes behind it.

The blocking parts (``flush``/``refill`` and their file IO) take their input
from, and return their result to, the trio thread: ``publish`` (``append``)
never does IO. Records are ``<u32 topic length><u32 payload length><topic><payload>``.
"""

from __future__ import annotations

import collections
import os
import struct
from dataclasses import dataclass

_HEADER = struct.Struct("<II")

#: Events kept in memory before the rest goes to the spill file.
MEMORY_LIMIT = 1000
#: A spill chunk is written out once it holds this many bytes.
CHUNK_BYTES = 64 * 1024
#: How much of the spill file one refill reads.
REFILL_BYTES = 256 * 1024


@dataclass
class Pending:
    topic: str
    payload: bytes
    rejections: int = 0


def encode(item: Pending) -> bytes:
    topic = item.topic.encode()
    return _HEADER.pack(len(topic), len(item.payload)) + topic + item.payload


def decode(data: bytes, limit: int = -1) -> tuple[list[Pending], int]:
    """The complete records at the start of data (at most ``limit`` if given), and how many
    bytes they take."""
    items: list[Pending] = []
    offset = 0
    while len(data) - offset >= _HEADER.size and len(items) != limit:
        topic_len, payload_len = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + topic_len + payload_len
        if end > len(data):
            break
        start = offset + _HEADER.size
        items.append(Pending(data[start : start + topic_len].decode(), data[start + topic_len : end]))
        offset = end
    return items, offset


def _open_spill_file(directory: str) -> int:
    """An unnamed file (gone with the shim, whatever happens); in /tmp if directory cannot."""
    for where in (directory, "/tmp"):
        try:
            return os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
    raise OSError("no directory for the event spill file")


class EventQueue:
    def __init__(self, directory: str = ".", memory_limit: int = MEMORY_LIMIT) -> None:
        self.directory = directory
        self.memory_limit = memory_limit
        self._memory: collections.deque[Pending] = collections.deque()
        self._chunk = bytearray()  # spilled, not yet written
        self._chunk_count = 0
        self._fd = -1
        self._read_at = 0  # file offset of the oldest spilled record not read back
        self._written = 0  # file offset where the next chunk goes
        self._on_disk = 0  # records in [read_at, written)
        self._flushing = 0  # records handed to a flush that has not returned

    # -- the trio thread --------------------------------------------------------

    def append(self, item: Pending) -> None:
        if self.spilled or len(self._memory) >= self.memory_limit:
            self._chunk += encode(item)
            self._chunk_count += 1
        else:
            self._memory.append(item)

    def __len__(self) -> int:
        return len(self._memory) + self.spilled

    @property
    def spilled(self) -> int:
        return self._on_disk + self._flushing + self._chunk_count

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    def head(self) -> Pending | None:
        """The oldest event, if it is in memory (else ``refill`` first)."""
        if not self._memory and self._on_disk == 0 and not self._flushing and self._chunk_count:
            self._take_chunk_back()
        return self._memory[0] if self._memory else None

    def popleft(self) -> None:
        self._memory.popleft()

    def clear(self) -> None:
        self._memory.clear()
        self._chunk.clear()
        self._chunk_count = self._on_disk = 0
        self._read_at = self._written = 0

    def needs_flush(self) -> bool:
        return len(self._chunk) >= CHUNK_BYTES and not self._flushing

    def needs_refill(self) -> bool:
        return not self._memory and self._on_disk > 0

    def take_chunk(self) -> tuple[bytes, int, int]:
        """Hand the chunk to a flush: (data, offset to write it at, records in it)."""
        data, count = bytes(self._chunk), self._chunk_count
        self._chunk.clear()
        self._chunk_count = 0
        self._flushing = count
        return data, self._written, count

    def flush_failed(self, data: bytes, count: int) -> None:
        """The write failed: the records go back in front of the chunk (kept in memory)."""
        self._chunk[:0] = data
        self._chunk_count += count
        self._flushing = 0

    def flushed(self, length: int, count: int) -> None:
        self._written += length
        self._on_disk += count
        self._flushing = 0

    def refill_range(self) -> tuple[int, int]:
        return self._read_at, min(REFILL_BYTES, self._written - self._read_at)

    def refilled(self, data: bytes) -> None:
        items, used = decode(data, max(1, self.memory_limit - len(self._memory)))
        self._memory.extend(items)
        self._read_at += used
        self._on_disk -= len(items)
        if self._on_disk == 0 and not self._flushing:
            self._read_at = self._written = 0  # all read back: the file is reused from the start

    def _take_chunk_back(self) -> None:
        """Nothing on disk or in flight: the unwritten chunk's records are next; keep them in memory."""
        items, used = decode(bytes(self._chunk), max(1, self.memory_limit - len(self._memory)))
        self._memory.extend(items)
        del self._chunk[:used]
        self._chunk_count -= len(items)

    # -- worker threads (blocking file IO) ---------------------------------------

    def write(self, data: bytes, offset: int) -> None:
        if self._fd < 0:
            self._fd = _open_spill_file(self.directory)
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def read(self, offset: int, length: int) -> bytes:
        """At least one whole record from offset (more than length if one record is longer)."""
        data = os.pread(self._fd, length, offset)
        if len(data) >= _HEADER.size and not decode(data)[0]:
            topic_len, payload_len = _HEADER.unpack_from(data)
            data = os.pread(self._fd, _HEADER.size + topic_len + payload_len, offset)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
