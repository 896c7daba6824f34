"""shim.common.record: the dataclass stand-in of the start/delete paths, checked against dataclasses.

``@record`` promises what our data classes use from ``@dataclass``: keyword
and positional ``__init__`` with defaults, fresh per-instance defaults
(``Factory``, like ``field(default_factory=...)``), ``__eq__``, ``__repr__``,
unhashable instances, and field names in declaration order. Each test runs
the same class body through both decorators and expects the same behaviour.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from shim.common.record import Factory, as_dict, field_names, record


def make_pair():
    """The same class, once as a record and once as a dataclass."""

    @record
    class R:
        name: str
        count: int = 0
        tags: list = Factory(list)
        flag: bool = False

    @dataclasses.dataclass
    class D:
        name: str
        count: int = 0
        tags: list = dataclasses.field(default_factory=list)
        flag: bool = False

    return R, D


R, D = make_pair()

CALLS = [
    ((), {"name": "a"}),
    (("a",), {}),
    (("a", 3), {}),
    (("a", 3, ["x"], True), {}),
    (("a",), {"flag": True}),
    ((), {"flag": True, "count": 2, "name": "b"}),
]

BAD_CALLS = [
    ((), {}),  # missing required
    (("a", 1, [], True, "extra"), {}),  # too many positional
    (("a",), {"name": "b"}),  # given twice
    ((), {"name": "a", "nope": 1}),  # unknown
]


@pytest.mark.parametrize("args,kwargs", CALLS)
def test_init_matches_dataclass(args, kwargs) -> None:
    r, d = R(*args, **kwargs), D(*args, **kwargs)
    assert as_dict(r) == dataclasses.asdict(d)
    assert repr(r) == repr(d).replace("make_pair.<locals>.", "").replace("D(", "R(", 1)


@pytest.mark.parametrize("args,kwargs", BAD_CALLS)
def test_bad_calls_fail_like_dataclass(args, kwargs) -> None:
    with pytest.raises(TypeError):
        D(*args, **kwargs)
    with pytest.raises(TypeError):
        R(*args, **kwargs)


def test_error_messages_name_the_problem() -> None:
    with pytest.raises(TypeError, match="missing argument 'name'"):
        R()
    with pytest.raises(TypeError, match="at most 4 positional"):
        R("a", 1, [], True, "extra")
    with pytest.raises(TypeError, match="'name'"):
        R("a", name="b")
    with pytest.raises(TypeError, match="'nope'"):
        R(name="a", nope=1)


def test_field_names_in_declaration_order() -> None:
    assert field_names(R) == field_names(R("a")) == tuple(f.name for f in dataclasses.fields(D))
    assert field_names(R) == ("name", "count", "tags", "flag")


def test_factory_default_is_fresh_per_instance() -> None:
    a, b = R("a"), R("b")
    a.tags.append(1)
    assert a.tags == [1] and b.tags == []
    assert a.tags is not b.tags
    # like a dataclass field with default_factory: no class attribute left behind
    assert not hasattr(R, "tags") and not hasattr(D, "tags")
    # a plain default stays a class attribute, as with dataclasses
    assert R.count == D.count == 0


def test_equality_like_dataclass() -> None:
    assert R("a", 1) == R("a", 1)
    assert R("a", 1) != R("a", 2)
    assert R("a", tags=[1]) != R("a", tags=[2])
    assert (D("a") == R("a")) is False  # another class: never equal (NotImplemented both ways)
    assert R("a").__eq__(D("a")) is NotImplemented
    assert R("a") != ("a", 0, [], False)


def test_instances_are_mutable_and_unhashable_like_dataclass() -> None:
    r = R("a")
    r.count = 5
    assert r == R("a", 5)
    with pytest.raises(TypeError):
        hash(r)
    with pytest.raises(TypeError):
        hash(D("a"))


def test_as_dict_is_a_shallow_snapshot() -> None:
    r = R("a", 2, ["t"])
    d = as_dict(r)
    assert d == {"name": "a", "count": 2, "tags": ["t"], "flag": False}
    d["count"] = 9
    assert r.count == 2
    assert d["tags"] is r.tags  # shallow, unlike dataclasses.asdict: fine for plain data


def test_methods_and_properties_survive() -> None:
    @record
    class WithMethods:
        x: int = 1

        @property
        def double(self) -> int:
            return 2 * self.x

        def plus(self, n: int) -> int:
            return self.x + n

    w = WithMethods(4)
    assert (w.double, w.plus(1)) == (8, 5)
    assert field_names(WithMethods) == ("x",)


def test_every_record_in_the_shim_round_trips() -> None:
    """The records the lean paths really use: built from their as_dict, equal again."""
    from shim.common.config import ShimConfig
    from shim.common.options import RuncOptions

    config = ShimConfig(namespace="ns", id="c1", bundle="/b", debug=True, thp_original=2)
    assert ShimConfig(**as_dict(config)) == config
    assert ShimConfig.decode(config.encode()) == config
    options = RuncOptions(binary_name="crun", systemd_cgroup=True, io_uid=5)
    assert RuncOptions(**as_dict(options)) == options
    assert options != RuncOptions()


def test_record_imports_nothing() -> None:
    """The point of the module: importing it (and using it) loads no other module
    (``__future__``, which its annotations import, is a few lines of pure Python)."""
    probe = (
        "import sys; before = set(sys.modules); "
        "from shim.common.record import record, as_dict\n"
        "@record\nclass C:\n    a: int = 1\n"
        "as_dict(C()); repr(C()); C() == C()\n"
        "new = set(sys.modules) - before - {'shim', 'shim.common', 'shim.common.record', '__future__'}\n"
        "print(sorted(new))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parent.parent)).stdout
    assert out.strip() == "[]", out
