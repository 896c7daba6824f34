"""The memory attribution tool's pure parts: maps, page classes, overlap math, the heap dump."""

from __future__ import annotations

import gc
import sys

import pytest

from bench import memattr
from bench.memattr import PAGE, Block, Mapping
from shim.template import heap, heapdump

MAPS = """\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 123 /opt/py/bin/python3.13
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7f0000021000-7f0004000000 ---p 00000000 00:00 0
7f1000000000-7f1000001000 ---p 00000000 00:00 0
7f1000001000-7f1000801000 rw-p 00000000 00:00 0
7f2000100000-7f2000200000 rw-p 00000000 00:00 0
7f3000000000-7f3000010000 r--p 00000000 08:01 9 /opt/py/lib/libpython3.13.so.1.0
7f3000010000-7f3000020000 rw-p 00010000 08:01 9 /opt/py/lib/libpython3.13.so.1.0
7f3100000000-7f3100001000 rw-p 00000000 08:01 7 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f3200000000-7f3200001000 rw-p 00000000 08:01 8 /usr/lib/x86_64-linux-gnu/libc.so.6
55d0a1000000-55d0a2000000 rw-p 00000000 00:00 0                          [heap]
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_parse_maps_reads_every_line_with_its_path():
    maps = memattr.parse_maps(MAPS)
    assert len(maps) == 12
    assert [m.start for m in maps] == sorted(m.start for m in maps)
    assert maps[0] == Mapping(0x55D0A0000000, 0x55D0A0001000, "r--p", 0, "/opt/py/bin/python3.13")
    assert maps[2].anonymous and not maps[0].anonymous
    assert maps[1].path == "[heap]"


def test_regions_by_mapping():
    maps = memattr.parse_maps(MAPS)
    assert [memattr.region(maps, i) for i in range(len(maps))] == [
        "python executable r/o (relro, text)",
        "malloc main arena ([heap])",
        "malloc thread arenas",  # 64 MiB aligned
        "other",  # its reserved, inaccessible rest
        "other",  # a guard page
        "thread stacks",  # right above a guard page
        "anonymous (obmalloc arenas, large blocks)",
        "libpython r/o (relro, text)",
        "libpython data",
        "ld.so data",
        "other .so data",
        "main thread stack",
    ]


def entry(pfn: int, present: bool = True, exclusive: bool = True) -> int:
    return pfn | (memattr.PRESENT if present else 0) | (memattr.EXCLUSIVE if exclusive else 0)


def test_decode_pagemap_entry():
    assert memattr.decode(entry(0x1234)) == (True, 0x1234, True)
    assert memattr.decode(entry(7, present=False, exclusive=False)) == (False, 7, False)


def test_classify_pages_copied_new_and_shared():
    shim = {
        0x1000: entry(10),  # same frame as the template: shared
        0x2000: entry(11),  # another frame: copied
        0x3000: entry(12),  # template has nothing there: new
        0x4000: entry(13, exclusive=False),  # another frame, but mapped by other processes too
        0x5000: entry(14, present=False),  # swapped
    }
    template = {0x1000: entry(10, exclusive=False), 0x2000: entry(20), 0x4000: entry(21)}
    assert memattr.classify_pages(shim, template) == {0x2000: "copied", 0x3000: "new"}


def test_overlaps_finds_blocks_across_page_edges():
    blocks = [Block(0x1000 - 16, 32, "code"), Block(0x1100, 64, "type"), Block(0x1F00, 0x300, "dict")]
    found = {b.kind: n for b, n in memattr.Index(blocks).overlaps(0x1000)}
    assert found == {"code": 16, "type": 64, "dict": 0x100}


def test_overlaps_finds_a_block_larger_than_the_page():
    blocks = [Block(0x800, 3 * PAGE, "code"), Block(0x3900, 16, "str")]
    assert [(b.kind, n) for b, n in memattr.Index(blocks).overlaps(0x2000)] == [
        ("code", PAGE)]


def test_attribute_splits_each_page_by_kind_and_region():
    maps = memattr.parse_maps(MAPS)
    heap = 0x55D0A1000000
    blocks = [Block(heap + 100, 1000, "code"), Block(heap + PAGE + 8, 8, "type")]
    out = memattr.attribute({heap: "copied", heap + PAGE: "new"}, maps, blocks)
    r = "malloc main arena ([heap])"
    assert out == {
        (r, "code", "copied"): 1000,
        (r, memattr.NO_OBJECT, "copied"): PAGE - 1000,
        (r, "type", "new"): 8,
        (r, memattr.NO_OBJECT, "new"): PAGE - 8,
    }
    assert sum(out.values()) == 2 * PAGE


def test_code_in_pages_counts_code_bytes_by_file():
    blocks = [Block(0, 100, "code", "/x/a.py:1:f"), Block(200, 100, "code", "/x/a.py:9:g"),
              Block(PAGE - 50, 100, "code", "/x/b.py:1:h"), Block(300, 50, "str")]
    assert memattr.code_in_pages([0], blocks) == {"/x/a.py": 200, "/x/b.py": 50}


def test_changed_words_and_density():
    before = bytes(PAGE)
    after = bytearray(PAGE)
    after[8] = 1
    after[4095] = 1
    words = memattr.changed_words(before, bytes(after), 0x7000)
    assert words == [0x7008, 0x7FF8]
    assert memattr.density(words + [0x9000]) == {"2-8": 1, "1": 1}


def test_writes_by_field_names_the_code_region():
    heap = 0x55D0A1000000
    blocks = [Block(heap + 0x100, 1000, "code"), Block(heap + 0x600, 64, "type")]
    words = [heap + 0x100, heap + 0x100 + memattr.CODE_HEADER, heap + 0x600 + 16, heap + 0x700, 0x10]
    out = memattr.writes_by_field(words, memattr.Index(blocks), memattr.parse_maps(MAPS))
    assert out == {("code", "header +0"): 1, ("code", "bytecode"): 1, ("type", "+16"): 1,
                   (memattr.NO_OBJECT, "malloc main arena ([heap])"): 1, (memattr.NO_OBJECT, "other"): 1}


def test_load_dump_reads_pid_and_blocks():
    pid, blocks = memattr.load_dump("# pid 42\n10 32 code /a.py:3:f x\n20 16 str -\n")
    assert pid == 42
    assert blocks == [Block(0x10, 32, "code", "/a.py:3:f x"), Block(0x20, 16, "str", "-")]


class Plain:
    pass


def test_heapdump_blocks_cover_the_gc_header_and_separate_tables():
    d = {i: i for i in range(50)}  # a table of its own, allocated apart from the dict
    (table, obj) = heapdump.blocks(d)
    assert obj == (id(d) - 16, dict.__basicsize__ + 16, "dict")
    assert table[2] == "dict-table" and table[1] == d.__sizeof__() - dict.__basicsize__
    assert not (table[0] <= id(d) < table[0] + table[1])
    s = "not a small string"
    assert heapdump.blocks(s) == [(id(s), sys.getsizeof(s), "str")]
    (obj,) = heapdump.blocks(Plain())
    assert obj[2] == "other"
    code = test_heapdump_blocks_cover_the_gc_header_and_separate_tables.__code__
    assert heapdump.blocks(code)[0][2] == "code"
    assert "test_memattr.py" in heapdump.label(code)


@pytest.mark.skipif(sys.version_info[:2] != (3, 13), reason="PyHeapTypeObject layout of CPython 3.13")
def test_heapdump_puts_a_class_and_its_shared_keys_in_blocks_of_their_own():
    """type.__sizeof__ counts the instances' shared keys, allocated apart from the class:
    counted in the class's block, they would hide what a shim writes there."""
    Plain().__dict__  # noqa: B018
    keys, cls = heapdump.blocks(Plain)
    assert cls == (id(Plain) - 16, type.__basicsize__ + 16, "type")
    assert keys[2] == "type-keys" and keys[0] == heap.cached_keys(Plain)
    assert keys[1] == sys.getsizeof(Plain) - cls[1]
    code = _branchy.__code__
    assert heapdump.referents(code)[-len(heap.CODE_PARTS):] == [getattr(code, name) for name in heap.CODE_PARTS]


def test_heapdump_reachable_leaves_out_its_own_bookkeeping():
    marker = [object()]
    found = heapdump.reachable()
    ids = {id(o) for o in found}
    assert id(marker) in ids and id(marker[0]) in ids
    as_ids = [o for o in found if type(o) is int and o in ids]
    # some are legitimate (the keys of tp_subclasses dicts); the walk's own set would be thousands
    assert len(as_ids) < len(found) / 10
    gc.collect()


def test_heapdump_reachable_finds_what_gc_freeze_froze():
    """The template freezes its whole heap before the dump: gc.get_objects() then lists none of it."""
    marker = [object()]
    gc.freeze()
    try:
        assert id(marker[0]) in {id(o) for o in heapdump.reachable()}
    finally:
        gc.unfreeze()


def test_heapdump_write_and_load_round_trip(tmp_path):
    path = tmp_path / "heap.txt"
    n = heapdump.write(str(path), 1234)
    pid, blocks = memattr.load_dump(path.read_text())
    assert pid == 1234 and len(blocks) == n > 1000
    assert {"code", "type", "dict", "str"} <= {b.kind for b in blocks}
    dicts = {b.label for b in blocks if b.kind in ("dict", "dict-table")}
    assert "module:bench.memattr" in dicts and "threading._active" in dicts  # a module's, one its globals name
    assert any(label.startswith("in:") for label in dicts)  # any other: after the type of an object holding it


def _branchy(x: int) -> int:
    if x:
        return x + 1
    return 0


@pytest.mark.skipif(sys.version_info[:2] != (3, 13), reason="bytecode names and type layout of CPython 3.13")
def test_instruction_changes_and_retagged_types_in_a_forked_child():
    """What a forked child rewrote, read from both processes' memory (/proc/PID/mem): the
    bytecode of a function it ran (quickening, counters, branch history) and the version tag of
    a class it first looked up."""
    import os

    fresh = type("Fresh", (), {})
    code = _branchy.__code__
    blocks = [Block(id(code), sys.getsizeof(code), "code", "_branchy"),
              Block(id(fresh) - 16, type(fresh).__basicsize__ + 16, "type", "Fresh")]
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(10):
                _branchy(i)
            getattr(fresh, "missing", None)
            os.write(ready_w, b"x")
            os.read(done_r, 1)  # stay until the parent has read our memory
        finally:
            os._exit(0)
    os.close(ready_w)  # a child that dies before its write gives EOF here, not a hang
    os.close(done_r)
    try:
        assert os.read(ready_r, 1) == b"x"
        changes = memattr.instruction_changes(pid, os.getpid(), [blocks[0]])
        retagged = memattr.retagged_types(pid, os.getpid(), blocks)
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, done_w):
            os.close(fd)
    assert changes["RESUME -> RESUME_CHECK"] == 1, changes
    assert any(k.startswith("POP_JUMP_IF_FALSE") for k in changes), changes
    assert [r.split("(")[0] for r in retagged] == ["Fresh"]


def test_writes_by_field_tells_pool_headers_apart():
    maps = [Mapping(0x100000, 0x200000, "rw-p", 0, "")]
    index = memattr.Index([])
    writes = memattr.writes_by_field([0x104000, 0x104000 + 64], index, maps, pool_headers=True)
    assert writes == {(memattr.NO_OBJECT, "obmalloc pool header"): 1,
                      (memattr.NO_OBJECT, "anonymous (obmalloc arenas, large blocks)"): 1}


def test_pools_in_use_reads_this_process_obmalloc_pools():
    """The pool headers found in the anonymous mappings add up to what obmalloc holds."""
    import os
    from pathlib import Path

    maps = memattr.parse_maps(Path("/proc/self/maps").read_text())
    pools = memattr.pools_in_use(os.getpid(), maps)
    assert all(size % 16 == 0 and 16 <= size <= 512 for size in pools)
    assert sum(pools.values()) > 1 << 20
    assert "by block size" in memattr.render_pools(pools, pools)
