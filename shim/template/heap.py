"""CPython heap sharing for the shims the template forks.

A forked shim shares the template's memory until it writes to a page. Two
things make it write where it need not: reference-count updates on objects it
merely touches, and new small objects landing in the free slots of the
template's partly used obmalloc pools. ``immortalize_heap`` stops the first
(PEP 683 immortal objects, 3.12+), ``fill_partial_pools`` the second. Both
reach below the public API, so each runs only on the CPython versions it was
verified on (``VERIFIED``), checks that this interpreter behaves as expected,
and does nothing otherwise: only a cost, never correctness, depends
on them.
"""

from __future__ import annotations

import gc
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from types import CodeType

#: The CPython versions whose internals both tricks were written and checked against (the
#: immortal refcount value, the format of sys._debugmallocstats). Another version runs without
#: them (more private memory per shim, nothing else) until someone checks it and adds it here.
VERIFIED = frozenset({(3, 12), (3, 13)})


def verified() -> bool:
    return sys.version_info[:2] in VERIFIED


def immortalize_heap() -> int:
    """Make every object reachable in the template immortal before forking.

    CPython 3.12+ (PEP 683) skips reference-count writes on immortal objects.
    Without this, a forked shim dirties (copies) every template page holding
    an object it merely touches; with it, those pages stay shared. Measured
    on 3.13: a forked shim serving a container holds ~3.7 MiB private instead
    of ~6.2 MiB. No public API marks objects immortal, so the refcount is set
    to the immortal value directly, after a self-check that this CPython
    treats it as such. Objects made immortal are never freed: fine for what
    the template built to share. The classes' shared dict keys too
    (settle_shared_keys). Returns how many objects were marked (0 when
    the interpreter is older or behaves differently).
    """
    if not verified() or not _immortal_refcounts_work():
        return 0
    import ctypes

    # The refcount itself marks what was visited: a set of ids would allocate an
    # int per object (~2.7 MiB for this heap), reachable through gc.get_objects
    # when the set existed before the call, so made immortal and kept forever;
    # the rest freed and left as holes for fill_partial_pools to fill. An object
    # immortal already (interned strings, static types, small ints) is skipped
    # with its referents: those are the GC's own objects, found in its list.
    stack = gc.get_objects()
    count = 0
    refcount = sys.getrefcount
    while stack:
        obj = stack.pop()
        if refcount(obj) == _IMMORTAL:
            continue
        ctypes.c_ssize_t.from_address(id(obj)).value = _IMMORTAL
        count += 1
        stack.extend(referents(obj))
    return count + settle_shared_keys()


#: What a code object holds that the GC does not see (code has no tp_traverse). Its constants
#: above all: LOAD_CONST takes a reference to a string, bytes, tuple or number constant each
#: time it runs, so a mortal one is a refcount write to a template page in every shim that runs
#: the code (bench.memattr: ~22,000 such objects, 2 MiB, among the template's pages). Only
#: attributes stored as they are: co_code, co_varnames and the like build a new object per read.
CODE_PARTS = ("co_consts", "co_names", "co_filename", "co_name", "co_qualname", "co_linetable",
              "co_exceptiontable")


def referents(obj: object) -> list[object]:
    """The objects obj refers to: the GC's view (gc.get_referents), plus a code object's parts."""
    out = gc.get_referents(obj)
    if type(obj) is _CODE:
        out.extend(getattr(obj, name) for name in CODE_PARTS)
    return out


_CODE = type(immortalize_heap.__code__)


_IMMORTAL = 0xFFFFFFFF  # _Py_IMMORTAL_REFCNT on 64-bit CPython 3.12/3.13


def _immortal_refcounts_work() -> bool:
    """True if an object given the immortal refcount keeps it through incref/decref."""
    if sys.version_info < (3, 12) or sys.maxsize < 2**32:
        return False
    import ctypes

    probe = [object()]
    cell = ctypes.c_ssize_t.from_address(id(probe))
    before = cell.value
    cell.value = _IMMORTAL
    alias = probe  # an incref
    del alias  # a decref
    unchanged = cell.value == _IMMORTAL and sys.getrefcount(probe) == _IMMORTAL
    if not unchanged:
        cell.value = before
    return unchanged


#: Where a heap type keeps its instances' shared dict keys (PyHeapTypeObject.ht_cached_keys),
#: on 64-bit CPython 3.13; checked at run time (_shared_keys_work) before anything is written.
HT_CACHED_KEYS = 880
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE
_DICT_KEYS_SPLIT = 2  # PyDictKeysObject.dk_kind of shared keys


def cached_keys(cls: type) -> int:
    """The address of a heap type's shared keys object (0: none, or not a heap type)."""
    import ctypes

    if not cls.__flags__ & _HEAPTYPE or sys.version_info[:2] != (3, 13) or sys.maxsize < 2**32:
        return 0
    return int(ctypes.c_void_p.from_address(id(cls) + HT_CACHED_KEYS).value or 0)


def _keys_fields(address: int) -> tuple[int, int, int, int]:
    """(dk_refcnt, dk_kind, dk_usable, dk_nentries) of the dict keys object at address."""
    import ctypes

    return (ctypes.c_ssize_t.from_address(address).value, ctypes.c_uint8.from_address(address + 10).value,
            ctypes.c_ssize_t.from_address(address + _DK_USABLE).value,
            ctypes.c_ssize_t.from_address(address + _DK_USABLE + 8).value)


_DK_USABLE = 16  # PyDictKeysObject.dk_usable (after dk_refcnt, three bytes and dk_version)


def _settle(keys: int) -> None:
    """Immortal count; and dk_usable 1 if the class has had attributes (see settle_shared_keys)."""
    import ctypes

    ctypes.c_ssize_t.from_address(keys).value = _IMMORTAL
    usable = ctypes.c_ssize_t.from_address(keys + _DK_USABLE)
    if ctypes.c_ssize_t.from_address(keys + _DK_USABLE + 8).value > 0:  # dk_nentries
        usable.value = min(usable.value, 1)


def _shared_keys_work() -> bool:
    """True if a class's shared keys are where HT_CACHED_KEYS says and behave as settle_shared_keys
    expects: an instance dict made counts them, an instance made takes one from dk_usable,
    and once settled, neither writes them."""
    class Probe:
        def __init__(self) -> None:
            self.a = 1

    keys = cached_keys(Probe)
    if not keys:
        return False
    refcount, kind, usable, entries = _keys_fields(keys)
    first = Probe().__dict__  # an instance's dict made: it shares (and counts) the keys
    after = _keys_fields(keys)
    if kind != _DICT_KEYS_SPLIT or after != (refcount + 1, kind, usable - 2, entries + 1):
        return False  # the instance took one for its attribute and one for being made
    _settle(keys)
    settled = _keys_fields(keys)
    second = Probe().__dict__
    del first, second
    return _keys_fields(keys) == settled == (_IMMORTAL, kind, 1, entries + 1)


def settle_shared_keys() -> int:
    """Stop the template's classes' shared instance-dict keys from being written (CPython 3.13).

    A class shares one keys object among its instances' dicts (split tables), and writes it
    more often than one would think: every instance made takes one from its ``dk_usable``
    (CPython's way of settling how many attributes the class's instances get: it stops at 1),
    every instance dict made (``obj.__dict__``, ``vars(obj)``) or given a table of its own
    counts it. The keys object lies next to its class among the template's pages, so the
    first instance a shim makes of each class copies that page for one changed word
    (bench.memattr: ~60 pages). Here each gets what CPython would settle on after enough
    instances, ``dk_usable`` 1, and the immortal count CPython leaves alone (as it does for
    its empty keys); a class holds its keys for its whole life, and the template's classes
    live as long as the template. An attribute the warm-up never set then goes to the
    instance's own dict after the first: correct, only a little larger. A class with no
    attribute yet (never instantiated here) keeps its room: settled, its instances would
    keep all but one attribute in a dict of their own. Returns how many.
    """
    if not verified() or not _shared_keys_work():
        return 0
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, type):
            keys = cached_keys(obj)
            if keys and _keys_fields(keys)[1] == _DICT_KEYS_SPLIT:
                _settle(keys)
                count += 1
    return count


def tag_types() -> int:
    """Give every class a type version tag now, in the template.

    CPython assigns a class its version tag (``tp_version_tag``, what the
    method cache and the specialised instructions' guards compare) on its
    first attribute lookup. A class the warm-up never used would get its tag
    in every forked shim: a write to the type object's page (a type is ~1 KiB,
    so one page per class), ~35 classes per shim (bench.memattr). Looking up a
    missing attribute assigns the tag of the class and of its metaclass
    without running any class's code (``type.__getattribute__`` skips a
    metaclass's ``__getattr__``). Returns how many classes were visited.
    """
    lookup = type.__getattribute__
    seen: set[int] = set()
    stack: list[type] = [object]
    while stack:
        cls = stack.pop()
        if id(cls) in seen:
            continue
        seen.add(id(cls))
        try:
            lookup(cls, "__shim_template_no_such_attribute__")
        except Exception:  # noqa: BLE001 - AttributeError; any other is as good: the tag is set
            pass
        try:
            stack.extend(type.__subclasses__(cls))
        except TypeError:
            pass
    return len(seen)


#: How often version_globals runs its probe per module: LOAD_GLOBAL specialises on its 2nd run.
_SPECIALISE_AFTER = 4


def version_globals() -> int:
    """Give every module's globals a keys version now, in the template.

    A specialised LOAD_GLOBAL guards on the version of the globals' (and builtins') keys,
    which CPython assigns on the first specialisation against them: in a forked shim, the
    first function it runs of a module nothing in the template specialised writes that
    module's keys page (bench.memattr: ~10 pages). A one-line function reading a global,
    run with each module's globals until it specialises, assigns them. Returns how many
    modules."""
    import types

    module = compile("def probe():\n    return __name__\n", "<shim template>", "exec")
    probe = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    count = 0
    for mod in list(sys.modules.values()):
        namespace = getattr(mod, "__dict__", None)
        if type(namespace) is not dict or "__name__" not in namespace:
            continue
        function = types.FunctionType(probe.replace(), namespace)  # a fresh copy: a cold instruction
        for _ in range(_SPECIALISE_AFTER):
            function()
        count += 1
    return count


#: The code objects pack_code replaced: kept, so that freeing them leaves no holes
#: among the template's pages for a shim's allocations to land in.
_REPLACED: list[object] = []


def pack_code(order: list[CodeType]) -> int:
    """Copy these code objects, in this order, into fresh memory; point their functions there.

    CPython 3.13 writes into a code object as it runs it: adaptive counters,
    inline caches, and on every conditional jump its branch history. So each
    page holding code a shim runs is copied into that shim, however warm the
    template made it. Imported code objects lie scattered among the strings
    and tuples unmarshalled with them: measured, a shim copied ~1.4 MiB of
    pages for a few hundred KiB of code it ran. Copied one after another in
    the order a lifecycle first runs them, they fill few pages.

    Functions (found through the GC) whose code is in ``order`` get the copy;
    a code object nested in a copied one's constants (a closure, a lambda) is
    copied with it when it is in ``order`` too. Run the warm-up again
    afterwards: the copies start unspecialised. Returns how many moved.
    """
    if not verified():
        return 0
    import types

    wanted = {id(code) for code in order}
    moved: dict[int, types.CodeType] = {}

    def copy(code: types.CodeType) -> types.CodeType:
        new = moved.get(id(code))
        if new is None:
            consts = tuple(copy(c) if isinstance(c, types.CodeType) and id(c) in wanted else c
                           for c in code.co_consts)
            new = moved[id(code)] = code.replace(co_consts=consts)
            _REPLACED.append(code)
        return new

    for code in order:  # replace() reads co_code, which allocates a cached copy: not between the copies
        code.co_code  # noqa: B018
    for code in order:
        copy(code)
    for f in gc.get_objects():
        if type(f) is types.FunctionType and id(f.__code__) in moved:
            f.__code__ = moved[id(f.__code__)]
    _carry_ki_protection(moved)
    return len(moved)


def _carry_ki_protection(moved: dict[int, CodeType]) -> None:
    """trio marks KeyboardInterrupt protection per code object: give each copy its original's mark."""
    from trio._core import _ki

    marks = _ki._CODE_KI_PROTECTION_STATUS_WMAP
    for old in _REPLACED:
        new = moved.get(id(old))
        if new is None:
            continue
        try:
            mark = marks[old]  # type: ignore[index]
        except KeyError:
            continue
        marks[new] = mark


def _malloc_stats() -> list[tuple[int, int]]:
    """(block size, free blocks in partly used pools) per obmalloc size class.

    Read from ``sys._debugmallocstats()``, which writes to the C-level stderr;
    empty when the output cannot be read (another allocator, another format).
    """
    import tempfile

    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        parts = line.split()  # class, size, pools, blocks in use, available blocks
        if len(parts) == 5 and all(p.isdigit() for p in parts):
            out.append((int(parts[1]), int(parts[4])))
    return out


#: What fill_partial_pools allocated: kept for the template's life (and so shared by every shim).
_FILLER: list[object] = []


def fill_partial_pools() -> int:
    """Occupy the free blocks of the template's partly used obmalloc pools.

    A forked shim's new small objects would otherwise land in those free
    slots, spread over hundreds of template pages, each of which the first
    write copies into the shim. Filled, they go to fresh pools: pages of the
    shim's own, packed. Measured on 3.13: ~0.2 MiB less private memory per
    shim. Returns how many blocks were filled.
    """
    if not verified():
        return 0
    stats = _malloc_stats()
    sizes = dict(stats)
    filled = sum(avail for size, avail in stats if size >= 48) + sizes.get(32, 0)
    keep: list[object] = [None] * filled
    i = 0
    for size, avail in stats:
        if size < 48:
            continue
        for _ in range(avail):
            keep[i] = bytes(size - 33)  # a bytes object of length n takes 33 + n bytes
            i += 1
    for n in range(sizes.get(32, 0)):
        keep[i] = (1 << 40) + n  # an int of this size takes 28: the 32-byte class
        i += 1
    _FILLER.append(keep)
    return filled


#: glibc's per-thread cache of freed chunks (tcache): up to 7 chunks per request size up to 1032.
TCACHE_MIN, TCACHE_MAX, TCACHE_COUNT = 24, 1032, 7
#: What fill_malloc_bins allocated (raw malloc pointers): kept for the template's life.
_MALLOC_FILLER: list[int] = []


def _malloc_free_chunks() -> list[tuple[int, int]]:
    """(chunk size, count) of the free chunks in glibc's main arena bins (malloc_info(3));
    empty when the C library is not glibc or its output cannot be read."""
    import ctypes
    import re
    import tempfile

    try:
        libc = ctypes.CDLL(None)
        malloc_info, fopen, fclose = libc.malloc_info, libc.fopen, libc.fclose
    except (OSError, AttributeError):
        return []
    fopen.restype = ctypes.c_void_p
    fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    fclose.argtypes = [ctypes.c_void_p]
    malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile() as t:
        stream = fopen(os.fsencode(t.name), b"w")
        if not stream:
            return []
        malloc_info(0, stream)
        fclose(stream)
        text = t.read().decode(errors="replace")
    main = text.split("</heap>", 1)[0]  # heap nr="0": the main arena
    return [(int(lo), int(n)) for lo, n in re.findall(r'<size from="(\d+)" to="\d+" total="\d+" count="(\d+)"/>', main)]


def fill_malloc_bins(rounds: int = 4) -> int:
    """Occupy the free chunks of malloc's main arena, as fill_partial_pools does obmalloc's.

    A forked shim's larger allocations (over 512 bytes: dict tables, big code and type
    objects, protobuf's arenas) would otherwise be carved out of free chunks scattered among
    the template's pages, copying each. Occupied, they come from the top of the heap: fresh
    pages, packed. Returns how many chunks were taken."""
    if not verified():
        return 0
    import ctypes

    malloc = ctypes.CDLL(None).malloc
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    taken = 0
    for size in range(TCACHE_MIN, TCACHE_MAX + 1, 16):  # the per-thread cache first: not in malloc_info
        for _ in range(TCACHE_COUNT):
            pointer = malloc(size)
            if pointer:
                _MALLOC_FILLER.append(pointer)
                taken += 1
    for _ in range(rounds):
        chunks = _malloc_free_chunks()
        if not chunks:
            break
        for size, count in chunks:
            request = max(size - 1 - 8, 16)  # malloc_info's "from" is a chunk size + 1; 8 bytes of header
            for _ in range(count):
                pointer = malloc(request)
                if pointer:
                    _MALLOC_FILLER.append(pointer)
                    taken += 1
    return taken
