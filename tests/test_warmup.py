"""Nothing a shim imports lazily may be left for after fork: the template imports it first.

A module imported in a forked shim is private memory in every shim; imported
in the template, it is shared. This finds the shim's modules the daemon
imports, lists their function-level imports and checks each is already loaded
once the template's warm-up ran.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: In a fresh interpreter: the shim's modules the daemon imports, then every module loaded once
#: the template's own warm-up (server._warm_up, as the template runs it) is done.
PROBE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import shim.daemon.main; "
    "imported = sorted(m for m in sys.modules if m == 'shim' or m.startswith('shim.')); "
    "from shim.template.server import _warm_up; _warm_up(); print(repr((imported, sorted(sys.modules))))"
)


def probe() -> tuple[list[str], set[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, check=True)
    imported, loaded = ast.literal_eval(out.stdout)
    return imported, set(loaded)


def source(module: str) -> Path:
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def lazy_imports(modules: list[str]) -> dict[str, set[str]]:
    """The function-level imports of each module (relative ones resolved), by module.

    The modules are the shim's own, as the daemon imports them (derived, not listed: a
    module added to the shim is covered without editing this test)."""
    found: dict[str, set[str]] = {}
    for module in modules:
        path = source(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                    names.add(".".join(base + ([node.module] if node.module else [])))
        found[module] = names
    return found


def test_the_daemon_side_is_derived_from_what_the_shim_imports() -> None:
    imported, _ = probe()
    assert "shim.daemon.service" in imported and "shim.common.options" in imported
    assert not any(m.startswith(("shim.launch", "shim.template")) for m in imported)  # other processes' code


def test_template_warm_up_loads_every_lazy_import() -> None:
    imported, loaded = probe()
    missing = {module: names - loaded for module, names in lazy_imports(imported).items() if names - loaded}
    assert missing == {}
