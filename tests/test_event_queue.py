"""shim.daemon.event_queue: FIFO order across memory, the unwritten chunk and the spill file."""

from __future__ import annotations

import random
from pathlib import Path

from shim.daemon.event_queue import CHUNK_BYTES, EventQueue, Pending, decode, encode


def item(n: int) -> Pending:
    return Pending("/tasks/exit", f"payload-{n}".encode() * (n % 7 + 1))


def test_records_round_trip() -> None:
    items = [item(n) for n in range(50)] + [Pending("/t", b"")]
    data = b"".join(encode(i) for i in items)
    decoded, used = decode(data + encode(item(99))[:5])  # a partial record at the end stays
    assert used == len(data)
    assert [(i.topic, i.payload) for i in decoded] == [(i.topic, i.payload) for i in items]


def drive(queue: EventQueue, rng: random.Random, total: int) -> list[bytes]:
    """Publish and consume in random interleavings, doing each flush/refill synchronously
    as the publisher's tasks would; the payloads in the order they left."""
    out: list[bytes] = []
    published = 0
    while len(out) < total:
        if published < total and rng.random() < 0.6:
            for _ in range(rng.randint(1, 300)):
                if published < total:
                    published += 1
                    queue.append(item(published))
            assert queue.in_memory <= queue.memory_limit
        if queue.needs_flush():
            data, offset, count = queue.take_chunk()
            queue.write(data, offset)
            queue.flushed(len(data), count)
        for _ in range(rng.randint(0, 200)):
            if queue.needs_refill():
                offset, length = queue.refill_range()
                queue.refilled(queue.read(offset, length))
            head = queue.head()
            if head is None:
                break
            out.append(head.payload)
            queue.popleft()
    assert len(queue) == 0
    return out


def test_order_is_kept_across_memory_chunk_and_file(tmp_path: Path) -> None:
    for seed in range(20):
        queue = EventQueue(str(tmp_path), memory_limit=50)
        try:
            out = drive(queue, random.Random(seed), 5000)
        finally:
            queue.close()
        assert out == [item(n).payload for n in range(1, 5001)], seed


def test_memory_is_bounded_while_nothing_leaves(tmp_path: Path) -> None:
    queue = EventQueue(str(tmp_path), memory_limit=100)
    try:
        for n in range(1, 50_001):
            queue.append(item(n))
            if queue.needs_flush():
                data, offset, count = queue.take_chunk()
                queue.write(data, offset)
                queue.flushed(len(data), count)
        assert queue.in_memory == 100
        assert len(queue._chunk) < CHUNK_BYTES
        assert len(queue) == 50_000
        assert list(tmp_path.iterdir()) == []  # an unnamed file
    finally:
        queue.close()


def test_a_failed_write_keeps_the_records_in_order(tmp_path: Path) -> None:
    queue = EventQueue(str(tmp_path), memory_limit=1)
    for n in range(1, 4):
        queue.append(item(n))
    data, _, count = queue.take_chunk()
    queue.append(item(4))  # published while the write was in flight
    queue.flush_failed(data, count)
    out = []
    while (head := queue.head()) is not None:
        out.append(head.payload)
        queue.popleft()
    assert out == [item(n).payload for n in range(1, 5)]
