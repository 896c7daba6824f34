"""runc options that reach the shim through ``ctr run --runtime-config-path``.

ctr 1.6 sends runc-style options only for io.containerd.runc.v2; for any
other runtime it sends ``runtimeoptions.v1.Options{config_path}`` (what CRI
sends too), whose TOML the shim reads. BinaryName is covered by test_crun.py;
under ``SHIM_RUNC_BINARY`` each TOML here names that binary too (a test's own
``--runtime-config-path`` replaces the session's).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from integration.harness import (
    EVENTUALLY,
    PY_RUNTIME,
    oci_runtime_binary,
    read_cmdline,
    runc_binary_toml,
    shim_pids,
    unix_socket_holders,
    wait_for,
)

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)

pytestmark = pytest.mark.skipif(RUNTIME != PY_RUNTIME, reason="runtime-config-path is how our runtime gets options")

V1_CONTROLLERS = ("memory", "pids")


@pytest.fixture
def shim_cgroup():
    """A v1 cgroup of our own in two controllers; removed afterwards."""
    name = f"shimtest-shimcg-{os.getpid()}"
    made = []
    for controller in V1_CONTROLLERS:
        path = Path("/sys/fs/cgroup") / controller / name
        path.mkdir()
        made.append(path)
    yield "/" + name
    for path in made:
        wait_for(lambda: not (path / "cgroup.procs").read_text().strip(), timeout=EVENTUALLY,
                 message=f"{path} to empty")
        path.rmdir()


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return ""


def test_shim_cgroup_moves_the_shim(containerd, image, cid, shim_cgroup, tmp_path):
    config = tmp_path / "runc.toml"
    config.write_text(runc_binary_toml() + f'ShimCgroup = "{shim_cgroup}"\n')
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--runtime-config-path", str(config), image, cid, "sleep", "60")
    [shim] = wait_for(lambda: shim_pids(cid, address=containerd.address), message=f"shim of {cid}")
    assert (containerd.bundle_dir / cid / "runtime").read_text() == oci_runtime_binary()
    for controller in V1_CONTROLLERS:
        assert cgroup_of(shim, controller) == shim_cgroup, (controller, read_cmdline(shim))
    init = int(containerd.tasks()[cid]["pid"])
    assert cgroup_of(init, "memory") != shim_cgroup  # only the shim moves
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_for(lambda: containerd.tasks()[cid]["status"] == "STOPPED", message="task stopped")
    containerd.ctr("task", "rm", cid)
    wait_for(lambda: not shim_pids(cid, address=containerd.address), timeout=EVENTUALLY, message="shim exit")


@pytest.fixture
def shim_socket(containerd, cid):
    """Path of the shim socket containerd derives for ``cid``; removed afterwards if a failed start left it."""
    path = Path("/run/containerd/s") / containerd.shim_socket_name(cid)
    yield path
    if path.is_socket() and not unix_socket_holders([str(path)])[str(path)]:
        path.unlink()


def test_missing_shim_cgroup_fails_the_start(containerd, image, cid, tmp_path, shim_socket):
    config = tmp_path / "runc.toml"
    config.write_text(runc_binary_toml() + 'ShimCgroup = "/shimtest-no-such-cgroup"\n')
    r = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(config), image, cid, "true", check=False
    )
    assert r.returncode != 0
    assert "shimtest-no-such-cgroup" in r.stderr
    assert not shim_pids(cid, address=containerd.address)


def test_missing_shim_cgroup_leaves_no_shim_socket(containerd, image, cid, tmp_path, shim_socket):
    config = tmp_path / "runc.toml"
    config.write_text(runc_binary_toml() + 'ShimCgroup = "/shimtest-no-such-cgroup"\n')
    r = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(config), image, cid, "true", check=False
    )
    assert r.returncode != 0
    assert not shim_socket.exists(), f"failed start left {shim_socket}"


def test_bad_runtime_options_toml_is_invalid_argument(containerd, image, cid, tmp_path):
    config = tmp_path / "runc.toml"
    config.write_text("BinaryName = [\n")
    r = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(config), image, cid, "true", check=False
    )
    assert r.returncode != 0
    assert "runtime options TOML" in r.stderr


@pytest.mark.parametrize("kind", ["missing", "not-executable"])
def test_a_runtime_binary_that_cannot_run_is_named_as_go_names_it(containerd, image, cid, tmp_path, shim_socket, kind):
    """containerd's TestContainerRuntimeOptionsv2: the error quotes the binary, in os/exec's words."""
    if kind == "missing":
        binary, words = "no-runc", 'exec: "no-runc": executable file not found in $PATH'
    else:
        binary = str(tmp_path / "runc-not-executable")
        Path(binary).write_text("#!/bin/sh\nexit 0\n")
        words = f'exec: "{binary}": permission denied'
    config = tmp_path / "runc.toml"
    config.write_text(f'BinaryName = "{binary}"\n')
    r = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(config), image, cid, "true", check=False
    )
    assert r.returncode != 0
    assert f"OCI runtime create failed: {words}" in r.stderr, r.stderr
    wait_for(lambda: not shim_pids(cid, address=containerd.address), timeout=EVENTUALLY, message="shim exit")
