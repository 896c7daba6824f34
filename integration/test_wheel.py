"""The shim as an installed Python tool (issue 17 §3): built as a wheel, pip-installed into a
fresh virtualenv outside the checkout, run by containerd from that virtualenv's bin/.

One test, since building and installing take a while: it checks the console entry point,
that the launcher starts lean (-I -S, the package found in site-packages, not the checkout),
the ``delete`` fast path of the script, and a container run through it by a real containerd.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from integration.harness import PROJECT_ROOT, RUNC_BINARY_ENV, oci_runtime_binary

ENTRY = "containerd-shim-runc-v2-py"


def run(*argv: str | Path, cwd: str | Path = "/") -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def installed(tmp_path: Path) -> Path:
    """The wheel built from this checkout, installed with the tested versions into a new venv."""
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", wheels,
        PROJECT_ROOT)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    (wheel,) = wheels.glob("*.whl")
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
        "-c", PROJECT_ROOT / "constraints.txt", wheel)
    return venv


def test_the_wheel_installed_into_a_fresh_venv_runs_a_container(containerd, image, cid, tmp_path: Path) -> None:
    assert not tmp_path.is_relative_to(PROJECT_ROOT)
    venv = installed(tmp_path)
    entry = venv / "bin" / ENTRY
    assert os.access(entry, os.X_OK)

    # The package comes from the venv's site-packages, and the launcher's -S start finds it there.
    where = run(venv / "bin" / "python", "-I", "-c", "import shim; print(shim.__file__)")
    assert Path(where.strip()).is_relative_to(venv), where
    trace = subprocess.run(["sh", "-x", str(entry), "-v"], capture_output=True, text=True, cwd="/", check=True)
    assert "Version:" in trace.stdout
    assert f"exec {venv}/bin/python -I -S -c" in trace.stderr, trace.stderr

    # delete after a clean Delete: the script prints the answer the shim left, without Python.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "delete-response").write_bytes(b"\x08\x07")
    out = subprocess.run([str(entry), "-namespace", "n", "-id", "x", "-bundle", str(bundle), "delete"],
                         capture_output=True, cwd="/", env={"PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout == b"\x08\x07"

    extra: list[str] = []
    if os.environ.get(RUNC_BINARY_ENV):
        extra = containerd.runc_binary_args(str(entry), oci_runtime_binary())
    try:
        done = containerd.ctr("run", "--rm", "--runtime", str(entry), *extra, image, cid,
                              "sh", "-c", "echo from-the-wheel; exit 7", check=False)
        assert done.returncode == 7, (done.stdout, done.stderr)
        assert done.stdout.strip() == "from-the-wheel"
    finally:
        containerd.stop_template(python=str(venv / "bin" / "python"))
