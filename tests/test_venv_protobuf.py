"""The virtualenv ``make venv`` made runs protobuf built for this CPython, not PyPI's stable-ABI wheel.

The wheel's extension targets the 3.10 stable ABI, whose Py_INCREF writes the refcount of
every message type it touches, immortal or not: on the template's frozen pages, so every
forked shim copies them (README, "protobuf from source"). Skipped where the build cannot
work (no C compiler or no Python.h): there make venv keeps the wheel and says so.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

CAN_BUILD = shutil.which("cc") is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


@pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no Python.h: make venv keeps the binary wheel")
def test_protobuf_is_built_for_this_python() -> None:
    import google._upb._message as upb
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")  # e.g. .cpython-313-x86_64-linux-gnu.so
    assert upb.__file__ is not None and upb.__file__.endswith(suffix), (
        f"{upb.__file__}: the stable-ABI wheel; `make venv` builds protobuf from source for {sys.version}")
