"""OpenSSL's modules stay out of a shim that never uses them, and load when something does.

Each case runs in a fresh interpreter: this one imported ssl long ago (pytest, trio).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_long_lived_shim_imports_without_openssl() -> None:
    out = _run(
        "import sys, shim.daemon.main, shim.daemon.service, trio\n"
        "print(sorted({'_ssl', '_hashlib'} & set(sys.modules)))"
    )
    assert out == "[]"


def test_a_deferred_module_becomes_the_real_one_when_used() -> None:
    out = _run(
        "import sys\n"
        "from shim.common.deferred import defer\n"
        "assert defer(('ssl', 'hmac')) == ['ssl', 'hmac']\n"
        "import ssl, hmac\n"
        "assert '_ssl' not in sys.modules and ssl.__spec__.name == 'ssl'\n"
        "held = ssl\n"
        "from ssl import SSLContext\n"  # the first use loads it
        "assert '_ssl' in sys.modules and held.SSLContext is SSLContext\n"
        "import ssl as again\n"
        "assert type(again).__name__ == 'module' and again.SSLContext is SSLContext\n"
        "print(hmac.compare_digest(b'x', b'x'))"
    )
    assert out == "True"


def test_an_imported_module_is_left_as_it_is() -> None:
    assert _run("import ssl\nfrom shim.common.deferred import defer\nprint(defer(('ssl',)))") == "[]"
