"""Nothing a shim imports lazily may be left for after fork: the template imports it first.

A module imported in a forked shim is private memory in every shim; imported
in the template, it is shared. This lists the function-level imports of the
daemon-side modules and checks each is already loaded once the template's
warm-up ran.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent.parent / "shim"
DAEMON_SIDE = ["daemon/main", "daemon/service", "daemon/container", "daemon/process", "daemon/stdio", "daemon/console",
               "daemon/logger", "daemon/fds", "daemon/cgroups", "daemon/netstats", "daemon/oom", "daemon/events",
               "common/options", "common/bundle", "common/mount", "daemon/reaper", "daemon/shimlog",
               "runc_client/client", "runc_client/config"]


def lazy_imports() -> set[str]:
    names: set[str] = set()
    for name in DAEMON_SIDE:
        tree = ast.parse((SHIM / f"{name}.py").read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
    return names


def test_template_warm_up_loads_every_lazy_import() -> None:
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import shim.daemon.main; "
        "from shim.template.warmup import warm_up; warm_up(); print(repr(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(SHIM.parent)], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout))
    assert lazy_imports() - loaded == set()
