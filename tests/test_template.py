"""shim.launch.template_client and shim.template.heap: the socket name must be the same wherever it is computed.

The launcher runs with ``python -I -S`` (no site-packages), the template and
the test harness with site: a fingerprint that depended on the difference
would make every start miss its template and spawn a new one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from shim.launch import template_client; print(template_client.socket_path('/run/c.sock'))"


def socket_path_with(*flags: str) -> str:
    return subprocess.run([sys.executable, *flags, "-c", PROBE], capture_output=True, text=True, check=True).stdout


def test_socket_path_is_the_same_with_and_without_site() -> None:
    assert socket_path_with("-I", "-S") == socket_path_with("-I") == socket_path_with()


def test_socket_path_differs_per_containerd() -> None:
    from shim.launch import template_client

    assert template_client.socket_path("/a/c.sock") != template_client.socket_path("/b/c.sock")
    assert template_client.socket_path("/a/c.sock").startswith("/run/containerd/s/py-template-")


def test_fill_partial_pools_leaves_no_free_slot_for_a_shim_to_dirty() -> None:
    import gc

    from shim.template import heap

    # Garbage earlier tests left (cycles a collection would free between the two reads) is
    # freed first, and no collection runs in between: the template collects before it fills too.
    gc.collect()
    gc.disable()
    try:
        free_before = sum(avail for size, avail in heap._malloc_stats() if size >= 48)
        filled = heap.fill_partial_pools()
        free_after = sum(avail for size, avail in heap._malloc_stats() if size >= 48)
    finally:
        gc.enable()
    assert filled >= free_before > 0
    assert free_after < free_before / 2, (free_before, free_after)  # reading the stats frees a few again


def test_heap_sharing_runs_only_on_verified_versions(monkeypatch) -> None:
    """Both tricks write CPython internals: on an unchecked version they must do nothing."""
    from shim.template import heap

    monkeypatch.setattr(heap, "VERIFIED", frozenset())
    assert heap.fill_partial_pools() == 0
    assert heap.immortalize_heap() == 0


def test_a_template_is_wanted_only_by_the_second_start_within_the_idle_timeout(tmp_path: Path) -> None:
    from shim.launch import template_client as template
    from shim.template import server

    assert template.WANTED_WITHIN == server.IDLE_TIMEOUT
    path = str(tmp_path / "py-template-x")
    assert not template.wanted(path, now=1000.0)  # the first start: only the mark
    assert Path(path + ".wanted").exists()
    assert template.wanted(path, now=1000.0 + template.WANTED_WITHIN)  # the second: launch it
    # a third before the template listens (containerd starts tasks concurrently): no first start
    # either, which would spawn a shim of its own (~18 MiB; 2 of 100 in a bench round)
    assert template.wanted(path, now=1000.0 + template.WANTED_WITHIN)
    assert not template.wanted(path, now=5000.0)  # later, the mark is old: marks again...
    assert not template.wanted(path, now=5000.0 + template.WANTED_WITHIN + 1)  # ...a stale mark is a first start
    assert template.wanted(path, now=5000.0 + template.WANTED_WITHIN + 2)


def test_of_two_first_starts_at_once_the_later_launches_the_template(tmp_path: Path, monkeypatch) -> None:
    """containerd starts tasks concurrently: another start may leave the first-start mark between
    this one's look and its own mark. Only one of the two may spawn a shim of its own (~18 MiB
    for its task's life); the other is the second start, so it launches the template."""
    import os

    from shim.launch import template_client as template

    path = str(tmp_path / "py-template-x")
    mark = path + ".wanted"
    real_stat = os.stat

    def looked_before_the_other_marked(p, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(p) == mark:
            Path(mark).touch()  # the other start marks it right after this one looked
            raise FileNotFoundError(mark)
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", looked_before_the_other_marked)
    assert template.wanted(path, now=1000.0)  # the other start is the first
    monkeypatch.setattr(os, "stat", real_stat)
    assert Path(mark).exists()  # the other's mark is left to it


def test_a_template_is_wanted_when_no_mark_can_be_kept(tmp_path: Path) -> None:
    from shim.launch import template_client as template

    assert template.wanted(str(tmp_path / "missing-dir" / "py-template-x"))


def test_a_dead_templates_successor_is_wanted_at_once(tmp_path: Path) -> None:
    """A template killed or retired leaves its pid file (a clean idle exit removes it): the
    host had two shims, so the next start relaunches it without a first-start mark."""
    from shim.launch import template_client as template

    path = str(tmp_path / "py-template-x")
    Path(path + ".pid").write_text("12345")
    assert template.wanted(path, now=1000.0)
    assert not Path(path + ".wanted").exists()


def test_tag_types_gives_a_class_its_version_tag_before_fork() -> None:
    """A class first looked up in a forked shim gets its version tag there: a write to the type
    object's page in every shim (bench.memattr found ~35 such classes per shim)."""
    import pytest

    testcapi = pytest.importorskip("_testcapi")
    from shim.template import heap

    fresh = type("Fresh", (), {})
    assert testcapi.type_get_version(fresh) == 0
    assert heap.tag_types() > 100
    assert testcapi.type_get_version(fresh) != 0


def _outer(n: int) -> int:
    def inner() -> int:
        return n + 1

    return inner()


def test_pack_code_points_functions_and_their_closures_at_copies() -> None:
    """The copies replace the originals everywhere a shim would run them: the function's code and
    the code of the closures it creates (from its constants); the originals are kept (freed, they
    would leave holes among the template's pages)."""
    import types

    from shim.template import heap

    _outer(1)
    code = _outer.__code__
    inner = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    assert heap.pack_code([code, inner]) == 2
    assert _outer.__code__ is not code and _outer.__code__.co_code == code.co_code
    assert next(c for c in _outer.__code__.co_consts if isinstance(c, types.CodeType)) is not inner
    assert _outer(2) == 3
    assert code in heap._REPLACED and inner in heap._REPLACED


def test_pack_code_keeps_trios_keyboard_interrupt_protection() -> None:
    """trio marks KeyboardInterrupt protection per code object: a copy must carry the mark."""
    import trio
    from trio._core import _ki

    from shim.template import heap

    @trio.lowlevel.enable_ki_protection
    def protected() -> int:
        return 1

    protected()
    heap.pack_code([protected.__code__])
    assert _ki._CODE_KI_PROTECTION_STATUS_WMAP[protected.__code__] is True


def test_fill_malloc_bins_leaves_few_free_chunks_for_a_shim_to_land_in() -> None:
    """A shim's larger allocations must come from fresh heap pages, not from the free chunks
    scattered among the template's (each would copy a page for a few bytes)."""
    from shim.template import heap

    kept = [bytes(600 + 16 * (i % 40)) for i in range(4000)]  # malloc'd (over 512 bytes)
    del kept[::2]  # holes between live blocks
    if not heap._malloc_free_chunks():
        pytest.skip("not glibc's malloc (no malloc_info)")
    before = sum(n for _, n in heap._malloc_free_chunks())
    assert heap.fill_malloc_bins() > 0
    after = sum(n for _, n in heap._malloc_free_chunks())
    assert before > 500 and after < before / 10, (before, after)


IMMORTAL_PROBE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from shim.template import heap

def f():
    return ("a string constant, not interned", b"bytes", (1.5, 2.5)), "x" in ("x y", "z w")

text, data, pair = f()[0]
assert heap.immortalize_heap() > 0
print(*(sys.getrefcount(c) == heap._IMMORTAL for c in (text, data, pair, f.__code__.co_consts, f.__code__.co_linetable)))
"""


def test_immortalize_heap_reaches_code_constants() -> None:
    """The GC does not see what a code object holds: its constants, which LOAD_CONST increfs
    each time it runs, must be made immortal too, or every shim running the code writes their
    pages (run in a child: it makes that whole process's heap immortal)."""
    from shim.template import heap

    if not heap.verified():
        pytest.skip("heap preparation is off on this CPython")
    out = subprocess.run([sys.executable, "-c", IMMORTAL_PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"] * 5


SETTLE_PROBE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from shim.template import heap

class Used:
    def __init__(self):
        self.a, self.b = 1, 2

class Fresh:
    def __init__(self):
        self.a, self.b = 1, 2

made = [Used() for _ in range(3)]
keys, fresh = heap.cached_keys(Used), heap.cached_keys(Fresh)
room = heap._keys_fields(fresh)[2]
settled = heap.settle_shared_keys() > 0
before = heap._keys_fields(keys)
later = [Used(), Used()]
vars(later[0])
print(settled, heap._keys_fields(keys) == before, heap._keys_fields(fresh)[2] == room)
"""


def test_settle_shared_keys_stops_instances_writing_their_class_keys() -> None:
    """Each instance made takes one from its class's shared keys (dk_usable), each instance
    dict made counts them: after settle_shared_keys, neither writes the keys (in a forked
    shim, the first instance of each class would copy the keys' page)."""
    from shim.template import heap

    if not heap.verified() or sys.version_info[:2] != (3, 13):
        pytest.skip("shared keys are settled on CPython 3.13 only")
    out = subprocess.run([sys.executable, "-c", SETTLE_PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]  # a class never instantiated keeps its room


def _keys_version(namespace: dict[str, object]) -> int:
    import ctypes

    keys = ctypes.c_void_p.from_address(id(namespace) + 32).value  # PyDictObject.ma_keys
    assert keys
    return ctypes.c_uint32.from_address(keys + 12).value  # PyDictKeysObject.dk_version


def test_version_globals_gives_every_module_its_keys_version(monkeypatch) -> None:
    """A module whose globals no specialised LOAD_GLOBAL read yet has keys version 0: the first
    function of it a forked shim runs would write the keys' page to assign one."""
    import types

    from shim.template import heap

    if sys.version_info[:2] != (3, 13):
        pytest.skip("dict keys layout of CPython 3.13")
    module = types.ModuleType("shim_fresh_module")
    exec("X = 1\ndef f():\n    return X\n", vars(module))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert _keys_version(vars(module)) == 0
    assert heap.version_globals() > 10
    assert _keys_version(vars(module)) != 0
