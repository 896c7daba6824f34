"""Plain-data classes for the modules on a container's start and delete paths.

Those paths run in a fresh interpreter once per container, and importing
``dataclasses`` (which pulls in inspect, re and enum) costs ~14 ms, half of
the launcher's whole start-up. ``@record`` gives what our data classes use
(keyword/positional __init__ with defaults, __eq__, __repr__, field names)
with no imports at all. Modules off the lean paths use dataclasses.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs ~10 ms to import
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:

    def dataclass_transform(**_: object) -> Callable[[T], T]:
        """typing's only marks the decorator for type checkers (who see the real one)."""
        return lambda f: f


class _Factory:
    """A default made fresh for every instance (like ``field(default_factory=...)``)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


if TYPE_CHECKING:

    def Factory(make: Callable[[], T]) -> T:
        """To a type checker a ``Factory(f)`` default is what ``f`` makes."""
        ...

else:
    Factory = _Factory


@dataclass_transform()
def record(cls: type[T]) -> type[T]:
    # Own annotations only; no inspect (heavy) on the lean path. Every @record module has
    # `from __future__ import annotations`, which keeps them in the class dict on 3.14 too.
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes at most {len(names)} positional arguments")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated argument {key!r}")
            values[key] = value
        for name in names:
            if name not in values:
                if name not in defaults:
                    raise TypeError(f"{cls.__name__}() missing argument {name!r}")
                default = defaults[name]
                values[name] = default.make() if isinstance(default, _Factory) else default
            object.__setattr__(self, name, values[name])

    def __eq__(self: Any, other: Any) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in names)

    def __repr__(self: Any) -> str:
        return f"{cls.__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__eq__ = __eq__  # type: ignore[method-assign]
    cls.__repr__ = __repr__  # type: ignore[method-assign]
    cls.__hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass
    cls.__record_fields__ = names  # type: ignore[attr-defined]
    for name, default in defaults.items():
        if isinstance(default, _Factory):
            delattr(cls, name)
    return cls


def field_names(obj_or_cls: Any) -> tuple[str, ...]:
    names: tuple[str, ...] = obj_or_cls.__record_fields__
    return names


def as_dict(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in field_names(obj)}
