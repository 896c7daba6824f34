"""Memory attribution: what a forked shim's private pages hold.

``python -m bench.memattr`` (root) starts a private containerd whose environment
names a heap dump file (``SHIM_PY_HEAPDUMP``), so the warm template, right before
it serves, writes where every object it holds sits (shim/template/heapdump.py). Then it
runs a full lifecycle through a shim forked from that template (tasks of one
group: a long-running one, a second one created, started, exec'd into with and
without a terminal, paused, resumed, listed, measured, killed, waited for and
deleted, a third run with --rm) and compares the shim's and the template's
page tables (/proc/PID/pagemap; page frame numbers need root) page by page:

* shared: the shim maps the same physical page as the template (or the page is
  a file page someone else maps too);
* copied: both map that virtual page, to different frames: the shim (or the
  template) wrote it after the fork;
* new: the template has nothing there (memory the shim allocated itself).

Copied and new pages are what the shim holds alone (its USS). Each is put in a
region by its mapping (/proc/PID/maps: libpython, ld.so, other shared
libraries, the [heap] malloc arena, malloc's thread arenas, thread stacks,
other anonymous memory, i.e. obmalloc arenas and large blocks) and its bytes
are split among the template objects that overlap it, by kind (code objects,
type objects, type dicts, other dicts, functions, ...); the rest of the page is
"no template object" (free space then, or the shim's own objects now).

``--pid SHIM --template PID --dump FILE`` attributes processes already running.
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import sys
import time
import types
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
PRESENT = 1 << 63
SWAPPED = 1 << 62
EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1
MALLOC_HEAP_ALIGN = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: thread arenas are aligned to it
GUARD_MAX = 64 << 10  # a thread stack's guard page(s) below it
NO_OBJECT = "no template object"

_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+\s*(.*)$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    path: str

    @property
    def anonymous(self) -> bool:
        return not self.path


@dataclass(frozen=True)
class Block:
    address: int
    size: int
    kind: str
    label: str = "-"

    @property
    def end(self) -> int:
        return self.address + self.size


def parse_maps(text: str) -> list[Mapping]:
    """/proc/PID/maps lines, in address order."""
    out = []
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            out.append(Mapping(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5].strip()))
    return sorted(out, key=lambda m: m.start)


def _library(path: str) -> str:
    name = os.path.basename(path)
    if name.startswith("libpython"):
        return "libpython"
    if name.startswith("ld-"):
        return "ld.so"
    if re.match(r"python\d", name):
        return "python executable"
    if ".so" in name:
        return "other .so"
    return "other file"


def region(maps: list[Mapping], i: int) -> str:
    """What mapping i of maps is, as the report groups it."""
    m = maps[i]
    if m.path.startswith("["):
        return {"[heap]": "malloc main arena ([heap])", "[stack]": "main thread stack"}.get(m.path, "other")
    if not m.anonymous:
        lib = _library(m.path)
        return f"{lib} data" if "w" in m.perms else f"{lib} r/o (relro, text)"
    if "w" not in m.perms:
        return "other"
    below = maps[i - 1] if i > 0 else None
    if m.start % MALLOC_HEAP_ALIGN == 0:
        return "malloc thread arenas"
    if below is not None and below.end == m.start and below.anonymous and below.perms.startswith("---") \
            and below.end - below.start <= GUARD_MAX:
        return "thread stacks"
    return "anonymous (obmalloc arenas, large blocks)"


def decode(entry: int) -> tuple[bool, int, bool]:
    """(present in RAM, page frame number (0 without root), mapped by this process only)."""
    return bool(entry & PRESENT), entry & PFN_MASK, bool(entry & EXCLUSIVE)


def classify_pages(shim: dict[int, int], template: dict[int, int]) -> dict[int, str]:
    """{virtual page address: "copied" | "new"} for the pages the shim alone maps (what USS counts).

    Both maps are {virtual page address: raw pagemap entry}. "copied": the
    template maps another frame at that address (one of the two wrote it after
    the fork); "new": the template has nothing there. Swapped pages count
    neither way.
    """
    out = {}
    for vaddr, entry in shim.items():
        present, pfn, exclusive = decode(entry)
        if not present or not exclusive:
            continue
        t_present, t_pfn, _ = decode(template.get(vaddr, 0))
        if not t_present:
            out[vaddr] = "new"
        elif t_pfn != pfn:
            out[vaddr] = "copied"
    return out


def changed_words(before: bytes, after: bytes, base: int) -> list[int]:
    """Addresses of the 8-byte words that differ between two copies of the page at base."""
    a = memoryview(before).cast("Q")
    b = memoryview(after).cast("Q")
    return [base + 8 * k for k in range(len(a)) if a[k] != b[k]]


POOL = 16 << 10  # obmalloc's pool size on 64-bit 3.13 (a pool header opens each)
POOL_HEADER = 48


def writes_by_field(words: Iterable[int], index: Index, maps: list[Mapping],
                    pool_headers: bool = False) -> Counter[tuple[str, str]]:
    """{(kind, where in the object): changed words}. Where: "+offset" into the block
    (code objects: "header" or "bytecode", by the code type's basic size); for a
    word in no template block, (NO_OBJECT, its region)."""
    out: Counter[tuple[str, str]] = Counter()
    starts_maps = [m.start for m in maps]
    for w in words:
        b = index.at(w)
        if b is None:
            i = bisect.bisect_right(starts_maps, w) - 1
            where = region(maps, i) if i >= 0 and maps[i].end > w else "other"
            if pool_headers and where.startswith("anonymous") and w % POOL < POOL_HEADER:
                where = "obmalloc pool header"
            out[(NO_OBJECT, where)] += 1
            continue
        offset = w - b.address
        if b.kind != "code":
            out[(b.kind, f"+{offset}")] += 1
        else:
            out[(b.kind, "bytecode" if offset >= CODE_HEADER else f"header +{offset}")] += 1
    return out


def written_code(words: Iterable[int], index: Index) -> Counter[str]:
    """{code object label: changed words}: the functions whose bytecode (counters, inline caches) the shim wrote."""
    out: Counter[str] = Counter()
    for w in words:
        b = index.at(w)
        if b is not None and b.kind == "code":
            out[b.label] += 1
    return out


#: where a code object's co_code_adaptive (bytecode and inline caches) starts, roughly
CODE_HEADER = types.CodeType.__basicsize__ - 8


class Index:
    """Blocks sorted by address, for the blocks overlapping a range."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self.blocks = sorted(blocks, key=lambda b: b.address)
        self.starts = [b.address for b in self.blocks]
        self.longest = max((b.size for b in self.blocks), default=0)

    def overlaps(self, page: int, size: int = PAGE) -> Iterator[tuple[Block, int]]:
        """(block, bytes of it inside [page, page + size)) for every block overlapping it.

        Blocks do not nest, so scanning back from the range's end until a block
        could no longer reach it (no block is longer than ``longest``) finds them all.
        """
        end = page + size
        i = bisect.bisect_left(self.starts, end) - 1
        while i >= 0 and self.starts[i] + self.longest > page:
            b = self.blocks[i]
            inside = min(b.end, end) - max(b.address, page)
            if inside > 0:
                yield b, inside
            i -= 1

    def at(self, address: int) -> Block | None:
        """The block holding address, if any."""
        i = bisect.bisect_right(self.starts, address) - 1
        b = self.blocks[i] if i >= 0 else None
        return b if b is not None and b.end > address else None


def attribute(pages: dict[int, str], maps: list[Mapping], blocks: list[Block]) -> dict[tuple[str, str, str], int]:
    """{(region, kind, "copied" | "new"): bytes} over the given private pages.

    A page's bytes are split among the template blocks that overlap it; what no
    block covers goes to NO_OBJECT.
    """
    index = Index(blocks)
    starts_maps = [m.start for m in maps]
    out: Counter[tuple[str, str, str]] = Counter()
    for page, how in pages.items():
        i = bisect.bisect_right(starts_maps, page) - 1
        where = region(maps, i) if i >= 0 and maps[i].end > page else "other"
        covered = 0
        for b, inside in index.overlaps(page):
            out[(where, b.kind, how)] += inside
            covered += inside
        if covered < PAGE:
            out[(where, NO_OBJECT, how)] += PAGE - covered
    return dict(out)


def code_in_pages(pages: Iterable[int], blocks: list[Block]) -> Counter[str]:
    """Bytes of copied pages that hold code objects, by the code's source file."""
    index = Index(b for b in blocks if b.kind == "code")
    out: Counter[str] = Counter()
    for page in pages:
        for b, inside in index.overlaps(page):
            out[b.label.split(":", 1)[0]] += inside
    return out


def load_dump(text: str) -> tuple[int, list[Block]]:
    """The heap dump: (the pid it describes, its blocks)."""
    pid = 0
    blocks = []
    for line in text.splitlines():
        if line.startswith("# pid "):
            pid = int(line.split()[2])
            continue
        parts = line.split(" ", 3)
        if len(parts) >= 3:
            blocks.append(Block(int(parts[0], 16), int(parts[1]), parts[2], parts[3] if len(parts) > 3 else "-"))
    return pid, blocks


def read_pagemap(pid: int, maps: list[Mapping]) -> dict[int, int]:
    """{virtual page address: raw entry} for every page of every mapping (present or not)."""
    out: dict[int, int] = {}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for m in maps:
            n = (m.end - m.start) // PAGE
            try:
                data = os.pread(fd, n * 8, (m.start // PAGE) * 8)
            except OSError:
                continue
            for k, entry in enumerate(memoryview(data).cast("Q")):
                if entry & (PRESENT | SWAPPED):
                    out[m.start + k * PAGE] = entry
    finally:
        os.close(fd)
    return out


def uss(pid: int) -> int:
    """Private_Clean + Private_Dirty (bytes) from smaps_rollup."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def page_details(shim: int, template: int, pages: list[int], blocks: list[Block], limit: int = 8) -> str:
    """One line per sparsely written copied page (<= limit changed words): its region, the
    template objects on it by kind, and each changed word: where (template object and field,
    or obmalloc pool header / block index and offset for a word in no template object) and its
    value before (template) and after (shim)."""
    index = Index(blocks)
    maps = parse_maps(Path(f"/proc/{shim}/maps").read_text())
    starts = [m.start for m in maps]
    lines = []
    fs, ft = os.open(f"/proc/{shim}/mem", os.O_RDONLY), os.open(f"/proc/{template}/mem", os.O_RDONLY)
    try:
        for page in pages:
            try:
                before, after = os.pread(ft, PAGE, page), os.pread(fs, PAGE, page)
            except OSError:
                continue
            words = changed_words(before, after, page)
            if not words or len(words) > limit:
                continue
            i = bisect.bisect_right(starts, page) - 1
            where = region(maps, i) if i >= 0 and maps[i].end > page else "other"
            kinds: Counter[str] = Counter(b.kind for b, _ in index.overlaps(page))
            pool = ""
            if where.startswith("anonymous"):
                header = _pool_header(ft, page)
                if header is not None:
                    pool = f" pool(size {header[1]}, used {header[0]}->{_pool_header(fs, page)[0]})"  # type: ignore[index]
            lines.append(f"{page:x} {where}{pool} objects: " + ",".join(f"{k}×{n}" for k, n in kinds.most_common())
                         + " | " + "; ".join(_word(w, page, before, after, index, where) for w in words))
    finally:
        os.close(fs)
        os.close(ft)
    return "\n".join(lines)


def _pool_header(fd: int, page: int) -> tuple[int, int] | None:
    """(blocks in use, block size) of the obmalloc pool holding page, if its header looks like one."""
    base = page - page % POOL
    try:
        head = os.pread(fd, POOL_HEADER, base)
    except OSError:
        return None
    count = int.from_bytes(head[0:4], "little")
    szidx = int.from_bytes(head[36:40], "little")
    return (count, 16 * (szidx + 1)) if szidx < 32 and count <= POOL // 16 else None


def _word(w: int, page: int, before: bytes, after: bytes, index: Index, where: str) -> str:
    k = w - page
    old = int.from_bytes(before[k:k + 8], "little")
    new = int.from_bytes(after[k:k + 8], "little")
    b = index.at(w)
    if b is not None:
        at = f"{b.kind} {_short(b.label)} +{w - b.address}"
    elif where.startswith("anonymous") and w % POOL < POOL_HEADER:
        at = f"pool header +{w % POOL}"
    elif where.startswith("anonymous"):
        at = f"pool +{w % POOL}"
    else:
        at = f"+{k}"
    return f"{at}: {old:x}->{new:x}"


def pools_in_use(pid: int, maps: list[Mapping]) -> Counter[int]:
    """{block size: bytes in use} over the obmalloc pools of a process, read from their headers
    (a 16 KiB-aligned header whose last offset fits its size class counts as a pool)."""
    out: Counter[int] = Counter()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for i, m in enumerate(maps):
            if not region(maps, i).startswith("anonymous"):
                continue
            for base in range(m.start + (-m.start) % POOL, m.end - POOL + 1, POOL):
                try:
                    head = os.pread(fd, POOL_HEADER, base)
                except OSError:
                    break
                count = int.from_bytes(head[0:4], "little")
                szidx = int.from_bytes(head[36:40], "little")
                size = 16 * (szidx + 1)
                if szidx < 32 and int.from_bytes(head[44:48], "little") == POOL - size and count <= POOL // size:
                    out[size] += count * size
    finally:
        os.close(fd)
    return out


def render_pools(shim: Counter[int], template: Counter[int]) -> str:
    delta = {size: shim[size] - template[size] for size in set(shim) | set(template)}
    return (f"obmalloc bytes in use: template {sum(template.values()) / 1024:.0f} KiB, shim "
            f"{sum(shim.values()) / 1024:.0f} KiB ({sum(delta.values()) / 1024:+.0f}); by block size: "
            + ", ".join(f"{size} {d / 1024:+.0f}" for size, d in sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:16]))


def library_symbols(path: str) -> list[tuple[int, str]]:
    """(offset, name) of a shared library's data symbols (``nm``), sorted; empty without nm."""
    import subprocess

    try:
        out = subprocess.run(["nm", path], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    syms = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "bBdD" and not parts[2].startswith("__"):  # __TMC_END__: a marker
            syms.append((int(parts[0], 16), parts[2]))
    return sorted(syms)


def libpython_writes(shim: int, template: int, pages: list[int], maps: list[Mapping]) -> str:
    """The changed words of libpython's data pages by the symbol they fall in: which static
    state of the interpreter a shim writes (pages: how many pages each symbol's words are on)."""
    lib = next((m for m in maps if _library(m.path) == "libpython"), None)
    if lib is None:
        return ""
    base = min(m.start - m.offset for m in maps if m.path == lib.path)
    syms = library_symbols(lib.path)
    starts = [a for a, _ in syms]
    words: Counter[str] = Counter()
    on_pages: dict[str, set[int]] = defaultdict(set)
    fs, ft = os.open(f"/proc/{shim}/mem", os.O_RDONLY), os.open(f"/proc/{template}/mem", os.O_RDONLY)
    try:
        for page in pages:
            m = next((m for m in maps if m.start <= page < m.end), None)
            if m is None or m.path != lib.path:
                continue
            for w in changed_words(os.pread(ft, PAGE, page), os.pread(fs, PAGE, page), page):
                i = bisect.bisect_right(starts, w - base) - 1
                name = syms[i][1] if i >= 0 else "?"
                key = _runtime_field(w - base - syms[i][0]) if name == "_PyRuntime" else name
                words[key] += 1
                on_pages[key].add(page)
    finally:
        os.close(fs)
        os.close(ft)
    return "libpython data writes by symbol (words/pages): " + ", ".join(
        f"{k} {n}/{len(on_pages[k])}" for k, n in words.most_common(30))


def unchanged_pages(shim: int, template: int, pages: list[int], maps: list[Mapping], blocks: list[Block]) -> str:
    """Copied pages whose content is the template's again (written and restored, by either side:
    a reference count up and down, or the template writing it after the fork), by region and
    the kind that fills most of each."""
    index = Index(blocks)
    starts = [m.start for m in maps]
    out: Counter[str] = Counter()
    fs, ft = os.open(f"/proc/{shim}/mem", os.O_RDONLY), os.open(f"/proc/{template}/mem", os.O_RDONLY)
    try:
        for page in pages:
            try:
                if os.pread(ft, PAGE, page) != os.pread(fs, PAGE, page):
                    continue
            except OSError:
                continue
            i = bisect.bisect_right(starts, page) - 1
            where = region(maps, i) if i >= 0 and maps[i].end > page else "other"
            kinds: Counter[str] = Counter()
            for b, n in index.overlaps(page):
                kinds[b.kind] += n
            out[f"{where.split(' (')[0]}/{kinds.most_common(1)[0][0] if kinds else NO_OBJECT}"] += 1
    finally:
        os.close(fs)
        os.close(ft)
    return ", ".join(f"{k} {n}" for k, n in out.most_common(12))


def _runtime_field(offset: int) -> str:
    """_PyRuntime is one huge struct: name its writes by 4 KiB slice."""
    return f"_PyRuntime@{offset // PAGE * 4}K"


def report(shim: int, template: int, blocks: list[Block], details: int = 0) -> str:
    """Markdown: the shim's private memory by region and kind, and the code it copied by file."""
    maps = parse_maps(Path(f"/proc/{shim}/maps").read_text())
    t_maps = parse_maps(Path(f"/proc/{template}/maps").read_text())
    pages = classify_pages(read_pagemap(shim, maps), read_pagemap(template, t_maps))
    if pages and all(decode(e)[1] == 0 for e in read_pagemap(shim, maps[:1]).values()):
        raise PermissionError("page frame numbers read as 0: run as root")
    table = attribute(pages, maps, blocks)
    copied = sorted(p for p, h in pages.items() if h == "copied")
    text = render(table, uss(shim), code_in_pages(copied, blocks))
    text += "\n\n" + render_pools(pools_in_use(shim, maps), pools_in_use(template, t_maps))
    files = sorted({m.path for m in maps if m.path.startswith("/")} - {m.path for m in t_maps})
    text += "\nfiles only the shim maps: " + (", ".join(files) or "none")
    writes, pages_by_words, code, sparse, run = diff_pages(shim, template, copied, blocks)
    retagged = retagged_types(shim, template, blocks)
    code_pages = {p for b in run for p in range(b.address // PAGE * PAGE, b.end, PAGE)}
    text += (f"\ncode the shim wrote: {len(run)} objects, {sum(b.size for b in run) / 1024:.0f} KiB, "
             f"on {len(code_pages)} pages ({len(code_pages) * PAGE // 1024} KiB); " + code_page_fill(code_pages, run, blocks))
    first: list[str] = []
    changes = instruction_changes(shim, template, run, first)
    files: Counter[str] = Counter()
    for label in code:
        files[_short(label.split(":", 1)[0])] += 1
    functions = ", ".join(f"{_short(k)} {n}" for k, n in code.most_common(30))
    return (text + "\n\n" + render_writes(writes) + "\ncopied pages by changed words (of 512): "
            + ", ".join(f"{label}: {pages_by_words[label]}" for _, label in _BUCKETS)
            + f" (unchanged now: {len(copied) - sum(pages_by_words.values())}: "
            + unchanged_pages(shim, template, copied, maps, blocks) + ")"
            + f"\ncode objects written: {len(code)}; by file: "
            + ", ".join(f"{f} {n}" for f, n in files.most_common(25))
            + f"\nmost written code (changed words): {functions}"
            + "\nwrites on sparse copied pages (<= 8 changed words): "
            + ", ".join(f"{k} {w} ×{n}" for (k, w), n in sparse.most_common(20))
            + "\nbytecode instructions changed (template -> shim): "
            + ", ".join(f"{k} ×{n}" for k, n in changes.most_common(30))
            + f"\ntypes whose version tag differs from the template's: {len(retagged)}: "
            + ", ".join(retagged[:40])
            + "\n" + libpython_writes(shim, template, copied, maps)
            + f"\ncode first run in the shim (not warmed in the template): {len(first)}: "
            + ", ".join(sorted(_short(label) for label in first))
            + (f"\n\ncopied pages with at most {details} changed words:\n" + page_details(shim, template, copied, blocks, details) if details else ""))


#: where tp_version_tag sits in a type's block (CPython 3.13, 64-bit: after the 16-byte GC header)
TYPE_VERSION_TAG = 16 + 384


def retagged_types(shim: int, template: int, blocks: list[Block]) -> list[str]:
    """The template types whose version tag the shim changed (re-assigned or invalidated): each
    change writes the type's page and misses every inline cache specialised on the old tag."""
    out = []
    fs, ft = os.open(f"/proc/{shim}/mem", os.O_RDONLY), os.open(f"/proc/{template}/mem", os.O_RDONLY)
    try:
        for b in blocks:
            if b.kind != "type":
                continue
            try:
                before = int.from_bytes(os.pread(ft, 4, b.address + TYPE_VERSION_TAG), "little")
                after = int.from_bytes(os.pread(fs, 4, b.address + TYPE_VERSION_TAG), "little")
            except OSError:
                continue
            if before != after:
                out.append(f"{b.label}({before}->{after})")
    finally:
        os.close(fs)
        os.close(ft)
    return out


def code_page_fill(pages: set[int], run: set[Block], blocks: list[Block]) -> str:
    """How full of written code the pages holding it are, and what else fills them."""
    index = Index(blocks)
    written = Index(run)
    fill: Counter[str] = Counter()
    other: Counter[str] = Counter()
    lonely: Counter[str] = Counter()
    for page in pages:
        mine = sum(n for _, n in written.overlaps(page))
        if mine <= PAGE // 4:
            for b, _ in written.overlaps(page):
                lonely[_short(b.label.split(":", 1)[0])] += 1
        fill[next(label for limit, label in ((1024, "<25%"), (2048, "25-50%"), (3072, "50-75%"), (4096, ">75%")) if mine <= limit)] += 1
        for b, n in index.overlaps(page):
            if b not in run:
                other["code not run" if b.kind == "code" else b.kind] += n
        other["nothing"] += PAGE - sum(n for _, n in index.overlaps(page))
    return ("written code per page: " + ", ".join(f"{k} {n}" for k, n in sorted(fill.items()))
            + "; the rest of those pages (KiB): " + ", ".join(f"{k} {n / 1024:.0f}" for k, n in other.most_common(8))
            + "; written code alone on its page (< 25%), by file: " + ", ".join(f"{k} {n}" for k, n in lonely.most_common(25)))


def diff_pages(shim: int, template: int, pages: list[int], blocks: list[Block]
               ) -> tuple[Counter[tuple[str, str]], Counter[str], Counter[str], Counter[tuple[str, str]], set[Block]]:
    """Which words of the copied pages differ now between template and shim, by object field;
    and the same for the words of sparsely written pages only; and the code blocks written."""
    words: list[int] = []
    fs, ft = os.open(f"/proc/{shim}/mem", os.O_RDONLY), os.open(f"/proc/{template}/mem", os.O_RDONLY)
    try:
        for page in pages:
            try:
                words += changed_words(os.pread(ft, PAGE, page), os.pread(fs, PAGE, page), page)
            except OSError:
                continue
    finally:
        os.close(fs)
        os.close(ft)
    index = Index(blocks)
    maps = parse_maps(Path(f"/proc/{shim}/maps").read_text())
    per_page: Counter[int] = Counter(w // PAGE for w in words)
    sparse = [w for w in words if per_page[w // PAGE] <= 8]
    code = {b for b in map(index.at, words) if b is not None and b.kind == "code"}
    return writes_by_field(words, index, maps), density(words), written_code(words, index), \
        writes_by_field(sparse, index, maps, pool_headers=True), code


def instruction_changes(shim: int, template: int, code: Iterable[Block], first: list[str] | None = None) -> Counter[str]:
    """{"template opcode -> shim opcode": instructions} over the bytecode of the given code
    objects: which instructions the shim re-wrote (its first run quickening an instruction,
    an adaptive counter counting down, a specialisation replaced after a guard failed).
    Decoded with this interpreter's opcode tables, so run it with the shim's Python. first,
    if given, gets the labels of the code the shim ran first (its RESUME quickened there)."""
    import dis

    out: Counter[str] = Counter()
    fs, ft = os.open(f"/proc/{shim}/mem", os.O_RDONLY), os.open(f"/proc/{template}/mem", os.O_RDONLY)
    try:
        for b in code:
            length = b.size - CODE_START
            if length <= 0:
                continue
            try:
                before = os.pread(ft, length, b.address + CODE_START)
                after = os.pread(fs, length, b.address + CODE_START)
            except OSError:
                continue
            i = 0
            while i + 1 < len(before):
                op = before[i]
                name = dis._all_opname[op] if op < len(dis._all_opname) else f"<{op}>"  # type: ignore[attr-defined]
                deop = dis._deoptop(op)  # type: ignore[attr-defined]
                size = 2 * (1 + dis._inline_cache_entries.get(dis.opname[deop], 0))  # type: ignore[attr-defined]
                if before[i:i + size] != after[i:i + size]:
                    op2 = after[i]
                    name2 = dis._all_opname[op2] if op2 < len(dis._all_opname) else f"<{op2}>"  # type: ignore[attr-defined]
                    what = "counter/cache" if before[i:i + 2] == after[i:i + 2] else name2
                    out[f"{name} -> {what}"] += 1
                    if first is not None and name == "RESUME" and what == "RESUME_CHECK":
                        first.append(b.label)
                i += size
    finally:
        os.close(fs)
        os.close(ft)
    return out


#: where a code object's co_code_adaptive starts (CPython 3.13: the code type's basic size)
CODE_START = types.CodeType.__basicsize__


def density(words: Iterable[int]) -> Counter[str]:
    """Copied pages by how many of their 512 words differ: few means a sparse write copied a whole page."""
    per_page: Counter[int] = Counter(w // PAGE for w in words)
    out: Counter[str] = Counter()
    for n in per_page.values():
        out[next(label for limit, label in _BUCKETS if n <= limit)] += 1
    return out


_BUCKETS = ((1, "1"), (8, "2-8"), (64, "9-64"), (256, "65-256"), (512, "257-512"))


def render_writes(writes: Counter[tuple[str, str]], top: int = 25) -> str:
    by_kind: Counter[str] = Counter()
    for (kind, _), n in writes.items():
        by_kind[kind] += n
    lines = [f"changed 8-byte words on copied pages: {sum(writes.values())}; by kind: "
             + ", ".join(f"{k} {n}" for k, n in by_kind.most_common()),
             "most written fields: " + ", ".join(f"{k} {w} ×{n}" for (k, w), n in writes.most_common(top))]
    return "\n".join(lines)


def render(table: dict[tuple[str, str, str], int], uss_bytes: int, code: Counter[str], top: int = 12) -> str:
    by_region: dict[str, Counter[str]] = defaultdict(Counter)
    for (where, kind, how), n in table.items():
        by_region[where][(kind, how)] += n
    lines = ["| region | what | copied KiB | new KiB |", "|---|---|---:|---:|"]
    totals = Counter()
    kinds: Counter[str] = Counter()
    for where in sorted(by_region, key=lambda w: -sum(by_region[w].values())):
        rows = by_region[where]
        copied = sum(n for (k, h), n in rows.items() if h == "copied")
        new = sum(n for (k, h), n in rows.items() if h == "new")
        lines.append(f"| **{where}** | all | **{copied / 1024:.0f}** | **{new / 1024:.0f}** |")
        for kind in sorted({k for k, _ in rows}, key=lambda k: -(rows[(k, "copied")] + rows[(k, "new")])):
            c, n = rows[(kind, "copied")], rows[(kind, "new")]
            kinds[kind] += c + n
            if c + n >= 4096:
                lines.append(f"| | {kind} | {c / 1024:.0f} | {n / 1024:.0f} |")
        totals["copied"] += copied
        totals["new"] += new
    lines.append(f"| **total** | | **{totals['copied'] / 1024:.0f}** | **{totals['new'] / 1024:.0f}** |")
    lines.append("")
    lines.append(f"private total {(totals['copied'] + totals['new']) / 1024:.0f} KiB; "
                 f"USS (smaps_rollup) {uss_bytes / 1024:.0f} KiB")
    lines.append("")
    lines.append("by kind, all regions: " + ", ".join(f"{k} {n / 1024:.0f} KiB" for k, n in kinds.most_common()))
    if code:
        lines.append("")
        lines.append("code objects on copied pages, by file (KiB of code bytes): " + ", ".join(
            f"{_short(f)} {n / 1024:.0f}" for f, n in code.most_common(top)))
    return "\n".join(lines)


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/shim/", 1)[-1] if "/shim/" in path else path


# -- the driver (root, containerd) ------------------------------------------------------------------

GROUP = "io.containerd.runc.v2.group=memattr"


def lifecycle(c: object, ref: str, runtime: list[str]) -> str:
    """Drive one forked shim through a full lifecycle; returns the id of the task it keeps serving."""
    from integration.harness import Containerd

    assert isinstance(c, Containerd)

    def ctr(*args: str) -> str:
        return str(c.ctr(*args, timeout=60).stdout)

    keep, other = "memattr-a", "memattr-b"
    ctr("run", "-d", *runtime, "--annotation", GROUP, ref, keep, "sleep", "86400")
    ctr("run", "--rm", *runtime, "--annotation", GROUP, ref, "memattr-c", "sh", "-c", "echo out; echo err >&2")
    ctr("run", "-d", *runtime, "--annotation", GROUP, ref, other, "sleep", "86400")
    ctr("task", "exec", "--exec-id", "e1", keep, "sh", "-c", "echo hi")
    _tty(c, "task", "exec", "-t", "--exec-id", "e2", keep, "sh", "-c", "tty; stty size")
    ctr("task", "ps", keep)
    ctr("task", "metrics", keep)
    ctr("task", "pause", other)
    ctr("task", "resume", other)
    ctr("task", "kill", "-s", "SIGKILL", other)
    _wait_stopped(c, other)
    ctr("task", "delete", other)
    ctr("containers", "rm", other)
    return keep


def _tty(c: object, *args: str) -> None:
    import shlex
    import subprocess

    argv = c.ctr_argv(*args)  # type: ignore[attr-defined]
    subprocess.run(["script", "-qec", shlex.join(argv), "/dev/null"], env=c.env,  # type: ignore[attr-defined]
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)


def _wait_stopped(c: object, cid: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while c.tasks().get(cid, {}).get("status") != "STOPPED":  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cid} not STOPPED")
        time.sleep(0.05)


def drive(settle: float, details: int = 0) -> str:
    """Private containerd, template with a heap dump, one lifecycle; the report."""
    import tempfile

    from integration.harness import Containerd, build_busybox_image, wait_for
    from shim.template.heapdump import ENV

    from .shims import BY_NAME, runtime_args

    work = tempfile.mkdtemp(prefix="memattr-")
    dump = os.path.join(work, "heap.txt")
    c = Containerd(log_level="warn", extra_env={ENV: dump})
    c.start()
    try:
        assert c.dir is not None
        tar = c.dir / "busybox-oci.tar"
        ref = build_busybox_image(tar)
        c.import_image(tar)
        runtime = runtime_args(c.dir, BY_NAME["python"])
        for cid in ("memattr-first", "memattr-second"):  # spawned; the second start launches the template
            c.ctr("run", "-d", *runtime, ref, cid, "sleep", "86400")
        wait_for(lambda: c.template_pid() is not None and os.path.exists(dump), timeout=30,
                 message="the template and its heap dump")
        keep = lifecycle(c, ref, runtime)
        time.sleep(settle)
        (shim,) = c.serving_shims(keep)
        template = c.template_pid()
        assert template is not None
        pid, blocks = load_dump(Path(dump).read_text())
        if pid != template:
            raise RuntimeError(f"the dump describes pid {pid}, the template is {template}")
        return f"shim {shim}, template {template}, {len(blocks)} template blocks\n\n" + report(shim, template, blocks, details)
    finally:
        c.stop_template()
        c.stop()
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memattr", description=__doc__.split("\n\n")[0])
    p.add_argument("--pid", type=int, help="attribute this running shim (with --template and --dump)")
    p.add_argument("--template", type=int)
    p.add_argument("--dump", help="the template's heap dump (SHIM_PY_HEAPDUMP)")
    p.add_argument("--pages", nargs="?", type=int, const=8, default=0, metavar="WORDS",
                   help="also list each copied page with at most WORDS (8) changed words, word by word")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after the lifecycle before reading")
    args = p.parse_args(argv)
    if args.pid:
        if not (args.template and args.dump):
            p.error("--pid needs --template and --dump")
        _, blocks = load_dump(Path(args.dump).read_text())
        print(report(args.pid, args.template, blocks, args.pages))
    else:
        print(drive(args.settle, args.pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
