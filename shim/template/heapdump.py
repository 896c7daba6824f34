"""Where the template's objects sit, for the memory attribution tool (bench/memattr.py).

Only used when ``SHIM_PY_HEAPDUMP`` names a file in the template's
environment: right before it serves, the template forks a throwaway child
that walks every object it can reach and writes one ``address size kind``
line per memory block. The child has the template's exact address space and
its allocations never touch the template's heap, so the dump changes nothing
a forked shim shares. The production path pays one environment lookup.
"""

from __future__ import annotations

import gc
import os
import sys

from .heap import cached_keys, referents

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import types

ENV = "SHIM_PY_HEAPDUMP"

_HAVE_GC = 1 << 14  # Py_TPFLAGS_HAVE_GC: a PyGC_Head (2 words) precedes the object
_PREHEADER = (1 << 3) | (1 << 4)  # Py_TPFLAGS_MANAGED_DICT | MANAGED_WEAKREF: 2 more words
_WORD = 8


def kind_of(obj: object) -> str:
    """The class an object's memory is reported under."""
    if isinstance(obj, type):
        return "type"
    if isinstance(obj, dict):
        return "dict"
    name = type(obj).__name__
    if name == "code":
        return "code"
    if name in ("function", "builtin_function_or_method", "method_descriptor", "wrapper_descriptor",
                "getset_descriptor", "member_descriptor", "classmethod", "staticmethod", "property", "cell"):
        return "function"
    if name in ("str", "bytes", "int", "float", "tuple", "frozenset"):
        return name
    return "other"


def blocks(obj: object) -> list[tuple[int, int, str]]:
    """(address, size, kind) of the memory blocks an object owns.

    The object itself (with its GC header and pre-header words when its type
    has them), plus for a dict with a table of its own and for a list their
    separately allocated table, and for a class its instances' shared dict keys.
    sys.getsizeof counts those in the object's size, so without them the object
    is its basic size.
    """
    t = type(obj)
    kind = kind_of(obj)
    flags = t.__flags__
    head = (2 * _WORD if flags & _HAVE_GC else 0) + (2 * _WORD if flags & _PREHEADER else 0)
    address = id(obj)
    out: list[tuple[int, int, str]] = []
    if isinstance(obj, (dict, list)):
        size = t.__basicsize__
        table = obj.__sizeof__() - size
        pointer = _read_pointer(address + (4 * _WORD if isinstance(obj, dict) else 3 * _WORD))
        if isinstance(obj, dict) and _read_pointer(address + 5 * _WORD):
            table = 0  # split table: its keys belong to the type, the values block is not exposed
        if table > 0 and pointer:
            out.append((pointer, table, "dict-table" if isinstance(obj, dict) else "list-table"))
    elif isinstance(obj, type):
        # type.__sizeof__ counts the instances' shared dict keys, a block of their own
        size = t.__basicsize__ + t.__itemsize__ * _read_pointer(address + 2 * _WORD)
        keys = cached_keys(obj)
        if keys:
            out.append((keys, sys.getsizeof(obj) - size - 2 * _WORD, "type-keys"))
    else:
        try:
            size = sys.getsizeof(obj)
        except TypeError:
            size = t.__basicsize__
        if flags & _HAVE_GC:
            size -= 2 * _WORD  # getsizeof adds the GC header, counted in head
    out.append((address - head, size + head, kind))
    return out


def label(obj: object) -> str:
    """Where a code object comes from (module:line qualname) or a type's name; "-" for the rest."""
    if type(obj).__name__ == "code":
        code: types.CodeType = obj  # type: ignore[assignment]
        return f"{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}".replace(" ", "_")
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}".replace(" ", "_")
    return "-"


def _read_pointer(address: int) -> int:
    import ctypes

    return int(ctypes.c_size_t.from_address(address).value)


def reachable() -> list[object]:
    """Every object reachable from the GC's lists (what the template made immortal).

    The GC's list is taken before the walk's own containers exist: the ints of
    ``seen`` would otherwise be reached through it and reported as template objects.
    It leaves out what gc.freeze() froze (the template's whole heap), so the objects are
    unfrozen first: call this in a throwaway process (dump_if_asked's child).
    """
    gc.unfreeze()
    stack = gc.get_objects()
    seen: set[int] = {id(stack)}
    out: list[object] = []
    seen.update((id(seen), id(out)))  # reached through a frame object when one exists (a tracer's)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        out.append(obj)
        stack.extend(referents(obj))
    return out


def write(path: str, owner: int) -> int:
    """Write every reachable object's blocks to path (atomically), headed by the pid whose
    address space they describe (owner); returns how many blocks."""
    type_dicts: set[int] = set()
    objects = reachable()
    for obj in objects:
        if isinstance(obj, type):
            type_dicts.update(id(r) for r in gc.get_referents(obj) if isinstance(r, dict))
    module_dicts = {id(vars(m)): f"module:{name}" for name, m in list(sys.modules.items()) if m is not None}
    for name, m in list(sys.modules.items()):  # and the dicts a module's globals name
        for attr, value in list(getattr(m, "__dict__", {}).items()):
            if type(value) is dict and id(value) not in module_dicts:
                module_dicts[id(value)] = f"{name}.{attr}"
    for obj in objects:  # any other dict: named after the type of an object holding it
        for r in gc.get_referents(obj):
            if type(r) is dict and id(r) not in module_dicts:
                holder = obj if isinstance(obj, type) else type(obj)
                module_dicts[id(r)] = "in:" + "_".join(str(type.__dict__["__qualname__"].__get__(holder)).split())
    lines = [f"# pid {owner}\n"]
    for obj in objects:
        prefix = "type-" if id(obj) in type_dicts else ""
        name = module_dicts.get(id(obj)) or label(obj)
        lines.extend(f"{address:x} {size} {prefix}{kind} {name}\n" for address, size, kind in blocks(obj))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.rename(tmp, path)
    return len(lines) - 1


def dump_if_asked() -> None:
    """In the template, right before it serves: fork a child that writes the dump, wait for it."""
    path = os.environ.get(ENV)
    if not path:
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            write(path, os.getppid())
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)
