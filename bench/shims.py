"""The shim variants the bench compares: the columns of the report.

* ``go``: containerd's Go shim, runtime ``io.containerd.runc.v2`` (the reference:
  every ratio is variant / go).
* ``python``: this shim in container mode (no runtime options: one shim per task,
  a CRI pod's containers share one), runtime ``io.containerd.runc.v2-py``.
* ``python-ns``: this shim in namespace mode: the same runtime with
  ``--runtime-config-path`` naming a TOML with ``ShimGroup = "namespace"``, so
  one shim process serves every task of the containerd namespace.
* ``rust``: the Rust shim (containerd/rust-extensions' runc shim), only when a
  ``containerd-shim-runc-v2-rs`` binary is found: ``$BENCH_RUST_SHIM`` (a path),
  else ``PATH``, else the PATH containerd runs the shims with.  Runtime
  ``io.containerd.runc.v2-rs`` when containerd resolves that name to the same
  binary; otherwise the binary's absolute path (containerd 1.6 takes one as
  ``--runtime``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from integration.harness import (
    GO_RUNTIME,
    PROJECT_BIN,
    PY_RUNTIME,
    RUNC_BINARY_ENV,
    SYSTEM_PATH,
    VENV_BIN,
)

RUST_SHIM_BINARY = "containerd-shim-runc-v2-rs"
RUST_RUNTIME = "io.containerd.runc.v2-rs"
RUST_ENV = "BENCH_RUST_SHIM"
#: the harness's switch that puts *every* run of our runtime in one ShimGroup; the bench
#: sets the group per variant itself, so it drops this variable (see __main__)
SHIM_GROUP_ENV = "SHIM_PY_GROUP"
NAMESPACE_GROUP = "namespace"
#: the PATH containerd (and so shim resolution) runs with: integration.harness.Containerd.env
CONTAINERD_PATH = os.pathsep.join([str(PROJECT_BIN), str(VENV_BIN), SYSTEM_PATH])


@dataclass(frozen=True)
class Variant:
    name: str  # key in results: go, python, python-ns, rust
    label: str  # column header
    family: str  # process family in bench/procs.py: go, python, rust
    runtime: str  # ``ctr run --runtime``
    short: str  # tag in container ids
    shim_group: str = ""  # ShimGroup in the runtime options TOML ("" = none given)
    binary: str | None = None  # the shim binary, when not containerd's usual lookup

    @property
    def namespace_mode(self) -> bool:
        return self.shim_group == NAMESPACE_GROUP


GO = Variant("go", "Go", "go", GO_RUNTIME, "go")
PYTHON = Variant("python", "Python", "python", PY_RUNTIME, "py")
PYTHON_NS = Variant("python-ns", "Python ns", "python", PY_RUNTIME, "pns", shim_group=NAMESPACE_GROUP)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_rust_shim(env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(absolute path of the Rust shim or None, a sentence on how it was found / why not)."""
    env = os.environ if env is None else env
    given = env.get(RUST_ENV, "").strip()
    if given:
        path = given if "/" in given else shutil.which(given, path=env.get("PATH"))
        if path and _executable(path):
            return os.path.abspath(path), f"${RUST_ENV}={given}"
        return None, f"${RUST_ENV}={given}: not an executable file"
    for where, search in (("PATH", env.get("PATH")), ("containerd's PATH", CONTAINERD_PATH)):
        path = shutil.which(RUST_SHIM_BINARY, path=search)
        if path:
            return os.path.abspath(path), f"{RUST_SHIM_BINARY} on {where}"
    return None, "not installed"


def rust_variant(path: str) -> Variant:
    """The Rust column: by runtime name if containerd resolves it to ``path``, else by path."""
    runtime = path
    if os.path.basename(path) == RUST_SHIM_BINARY:
        found = shutil.which(RUST_SHIM_BINARY, path=CONTAINERD_PATH)
        if found and os.path.realpath(found) == os.path.realpath(path):
            runtime = RUST_RUNTIME
    return Variant("rust", "Rust", "rust", runtime, "rs", binary=path)


def detect(env: dict[str, str] | None = None) -> tuple[tuple[Variant, ...], str]:
    """(the variants of this run, the Rust shim's status sentence)."""
    path, how = find_rust_shim(env)
    variants = [GO, PYTHON, PYTHON_NS]
    if path is not None:
        variants.append(rust_variant(path))
    return tuple(variants), how


VARIANTS, RUST_STATUS = detect()
BY_NAME = {v.name: v for v in VARIANTS}
RUST_PATH = BY_NAME["rust"].binary if "rust" in BY_NAME else None


def runtime_options_toml(v: Variant) -> str | None:
    """The runtime options TOML a variant runs with (None: no ``--runtime-config-path``).

    Only namespace mode needs one.  ``$SHIM_RUNC_BINARY`` goes in too, as the
    harness would put it in the container-mode variant's TOML.
    """
    if v.family != "python" or not v.shim_group:
        return None
    binary = os.environ.get(RUNC_BINARY_ENV, "")
    return (f"ShimGroup = {json.dumps(v.shim_group)}\n"
            + (f"BinaryName = {json.dumps(binary)}\n" if binary else ""))


def runtime_args(workdir: Path, v: Variant) -> list[str]:
    """``ctr run`` flags selecting variant ``v``; its TOML (if any) is written under ``workdir``."""
    args = ["--runtime", v.runtime]
    toml = runtime_options_toml(v)
    if toml is not None:
        path = workdir / f"bench-runtime-{v.name}.toml"
        if not path.exists() or path.read_text() != toml:
            path.write_text(toml)
        args += ["--runtime-config-path", str(path)]
    return args


def version(path: str) -> str | None:
    """First non-empty line(s) of ``BINARY -v`` (the Go and Rust shims both answer it)."""
    for flag in ("-v", "--version"):
        try:
            r = subprocess.run([path, flag], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        text = " ".join((r.stdout or r.stderr).split())
        if r.returncode == 0 and text:
            return text[:200]
    return None


def describe() -> dict:
    """For latest.json: every variant, with how to select it, and the Rust shim's status."""
    out = {"variants": [asdict(v) | {"namespace_mode": v.namespace_mode,
                                     "runtime_options_toml": runtime_options_toml(v)} for v in VARIANTS],
           "rust_shim": {"status": RUST_STATUS, "path": RUST_PATH}}
    if RUST_PATH:
        out["rust_shim"]["version"] = version(RUST_PATH)
    return out
