"""Modules the shim's libraries import but the shim never uses, loaded only if used.

trio imports ``ssl`` (for trio.SSLStream) and ``hmac`` (for DTLS cookies) when
it is imported; both load OpenSSL: ``_ssl`` and ``_hashlib`` map libssl and
libcrypto and build their tables, ~2 MiB of Pss in every interpreter that has
them (measured: a lone shim, `import shim.daemon.main`), for code a shim never
runs. A stand-in in ``sys.modules`` carries the real module's spec, so ``import
ssl`` takes it as already imported; the first attribute read that is not the
spec's (``ssl.SSLContext``) imports the real module, which from then on serves
both the stand-in's holders and every later import.

``importlib.util.LazyLoader`` is not enough: the import statement itself reads
``__spec__`` of a module found in ``sys.modules``, which makes it load.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

#: Imported by trio, never used by the shim (see the module's docstring).
UNUSED_BY_THE_SHIM = ("ssl", "hmac")


class _Deferred(ModuleType):
    """A module that becomes the real one on its first attribute read."""

    def __getattr__(self, name: str) -> Any:  # only for what the stand-in lacks
        real = _load(self.__name__, self)
        return getattr(real, name)


def _load(name: str, stand_in: ModuleType) -> ModuleType:
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    real = importlib.import_module(name)
    stand_in.__dict__.update(real.__dict__)
    return real


def defer(names: tuple[str, ...] = UNUSED_BY_THE_SHIM) -> list[str]:
    """Put stand-ins for these modules in sys.modules (those not imported yet and found);
    returns the names deferred."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__ = spec
        stand_in.__file__ = spec.origin
        stand_in.__loader__ = spec.loader
        sys.modules[name] = stand_in
        deferred.append(name)
    return deferred
