"""crun instead of runc, chosen the way containerd 1.6 lets ctr choose it for a
non-runc runtime type: ``ctr run --runtime-config-path FILE`` with a TOML
``BinaryName = "crun"``, which reaches the shim as ``runtimeoptions.v1.Options``.

crun 1.8 refuses a hybrid cgroup host while any controller is left on the
cgroup v2 (unified) hierarchy ("cgroups in hybrid mode not supported, drop
all controllers from cgroupv2"); on this VM that is hugetlb, which has no v1
mount. The module fixture ``hugetlb_v1`` (``harness.hugetlb_on_v1``) mounts it
on v1 (only if it is not mounted already) and undoes exactly that afterwards.
The negative test runs first, before the mount, and only where crun would
refuse -- so not under ``SHIM_RUNC_BINARY=crun``, whose session fixture
(conftest.py) has mounted hugetlb before any test runs.

With ``SHIM_RUNTIME=io.containerd.runc.v2`` the same tests run the Go shim
with ``--runc-binary crun`` (ctr ignores --runtime-config-path for it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess

import pytest

from integration.harness import (
    CRUN_HYBRID_ERROR,
    GO_RUNTIME,
    PY_RUNTIME,
    PY_SHIM_BINARY,
    RUNC_ROOT,
    HugetlbMountError,
    crun_has_criu,
    crun_refuses_host,
    hugetlb_on_v1,
    oci_runtime_binary,
    pid_alive,
    wait_for,
)

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
IS_GO_SHIM = RUNTIME == GO_RUNTIME
CRUN = shutil.which("crun")
EXIT_CODE_RE = re.compile(r"exit with non-zero exit code (\d+)")

pytestmark = pytest.mark.skipif(CRUN is None, reason="crun not installed")


@pytest.fixture(autouse=True)
def _shim_installed(containerd):
    if RUNTIME == PY_RUNTIME and shutil.which(PY_SHIM_BINARY, path=containerd.env["PATH"]) is None:
        pytest.fail(f"{PY_SHIM_BINARY} not found on containerd's PATH ({containerd.env['PATH']})")


# -- the hugetlb v1 mount (integration.harness.hugetlb_on_v1) ------------------------------

@pytest.fixture(scope="module")
def hugetlb_v1():
    """hugetlb on cgroup v1 for the module, if crun needs it (see ``harness.hugetlb_on_v1``).

    Under ``SHIM_RUNC_BINARY=crun`` the session fixture in conftest.py has
    mounted it already; then this one finds it mounted and does nothing.
    """
    with contextlib.ExitStack() as stack:
        try:
            mounted = stack.enter_context(hugetlb_on_v1())
        except HugetlbMountError as e:
            pytest.skip(str(e))
        yield mounted


# -- helpers -------------------------------------------------------------------------------

def crun_args(containerd) -> list[str]:
    return containerd.runc_binary_args(RUNTIME, "crun")


def task_status(containerd, cid) -> str | None:
    t = containerd.tasks().get(cid)
    return t["status"] if t else None


def wait_status(containerd, cid, status, timeout=10.0):
    wait_for(lambda: task_status(containerd, cid) == status, timeout=timeout,
             message=lambda: f"task {cid} to be {status} (is {task_status(containerd, cid)})")


def runtime_state(binary: str, containerd, cid) -> subprocess.CompletedProcess:
    root = RUNC_ROOT / containerd.namespace
    return subprocess.run([binary, "--root", str(root), "state", cid], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


# -- tests (the negative one first: it needs hugetlb still on cgroup v2) ---------------------

def test_without_hugetlb_on_v1_crun_error_surfaces(containerd, image, cid):
    if not crun_refuses_host():
        pytest.skip("crun accepts this host's cgroups as they are (hugetlb already on v1 -- e.g. by the "
                    "SHIM_RUNC_BINARY=crun session fixture -- or not a hybrid host)")
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, *crun_args(containerd), image, cid, "true",
                       check=False)
    assert r.returncode != 0, r.stdout
    assert CRUN_HYBRID_ERROR in r.stderr, r.stderr
    assert "OCI runtime create failed" in r.stderr, r.stderr
    assert cid not in containerd.tasks()


@pytest.mark.parametrize("code", [0, 3])
def test_crun_run_rm_output_and_exit_code(containerd, image, cid, hugetlb_v1, code):
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, *crun_args(containerd), image, cid,
                       "sh", "-c", f"echo hello; echo err >&2; exit {code}", check=False)
    assert r.returncode == code, r.stderr
    assert r.stdout == "hello\n"
    assert r.stderr == "err\n"
    assert cid not in containerd.containers()


def test_crun_detached_exec_kill_delete(containerd, image, cid, hugetlb_v1):
    r = containerd.ctr("run", "-d", "--runtime", RUNTIME, *crun_args(containerd), image, cid, "sleep", "300",
                       check=False)
    assert r.returncode == 0, r.stderr
    wait_status(containerd, cid, "RUNNING")
    pid = int(containerd.tasks()[cid]["pid"])

    # crun really runs it: the shim recorded crun, and the container's state is crun's
    bundle = containerd.bundle_dir / cid
    assert (bundle / "runtime").read_text() == "crun"
    assert json.loads((bundle / "options.json").read_text())["binary_name"] == "crun"
    state = runtime_state("crun", containerd, cid)
    assert state.returncode == 0, state.stderr
    assert json.loads(state.stdout)["pid"] == pid
    assert json.loads(state.stdout)["status"] == "running"
    assert (RUNC_ROOT / containerd.namespace / cid / "status").is_file()  # crun's, not runc's state.json
    assert runtime_state("runc", containerd, cid).returncode != 0

    r = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo fromexec; exit 4", check=False)
    assert r.returncode == 4, r.stderr
    assert r.stdout == "fromexec\n"
    ps = containerd.ctr("task", "ps", cid).stdout.splitlines()
    assert [int(line.split()[0]) for line in ps[1:]] == [pid]

    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    r = containerd.ctr("task", "rm", cid)
    m = EXIT_CODE_RE.search(r.stderr)
    assert m and int(m.group(1)) == 137, r.stderr
    containerd.ctr("containers", "rm", cid)
    wait_for(lambda: not pid_alive(pid), timeout=5, message=f"init {pid} to be gone")
    assert runtime_state("crun", containerd, cid).returncode != 0
    last = []

    def nothing_left():
        last[:] = [containerd.leftovers([cid])]
        return not last[0]
    wait_for(nothing_left, timeout=10, message=lambda: f"no leftovers; still: {last[0]}")


# -- checkpoint with a crun built without CRIU (Debian's crun 1.8) ---------------------------

needs_crun_without_criu = pytest.mark.skipif(
    CRUN is None or crun_has_criu(CRUN), reason="this crun has CRIU support (+CRIU): it has a checkpoint command")


def _run_and_checkpoint(containerd, image, cid) -> tuple[subprocess.CompletedProcess, int]:
    r = containerd.ctr("run", "-d", "--runtime", RUNTIME, *crun_args(containerd), image, cid, "sleep", "300",
                       check=False)
    assert r.returncode == 0, r.stderr
    wait_status(containerd, cid, "RUNNING")
    pid = int(containerd.tasks()[cid]["pid"])
    return containerd.ctr("task", "checkpoint", cid, check=False, timeout=120), pid


@needs_crun_without_criu
def test_crun_without_criu_checkpoint_error_surfaces_task_keeps_running(containerd, image, cid, hugetlb_v1):
    r, pid = _run_and_checkpoint(containerd, image, cid)
    bundle = containerd.bundle_dir / cid
    assert r.returncode != 0, r.stdout
    assert "unknown command checkpoint" in r.stderr, r.stderr  # crun's own words
    assert "criu" not in r.stderr.replace(f"{bundle}/criu-dump.log", ""), r.stderr  # criu never ran
    assert not (bundle / "criu-dump.log").exists()
    assert not (bundle / "criu-work").exists() and not (bundle / "work" / "criu-work").exists()

    assert task_status(containerd, cid) == "RUNNING"
    assert int(containerd.tasks()[cid]["pid"]) == pid and pid_alive(pid)
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    r = containerd.ctr("task", "rm", cid)
    m = EXIT_CODE_RE.search(r.stderr)
    assert m and int(m.group(1)) == 137, r.stderr
    containerd.ctr("containers", "rm", cid)


@needs_crun_without_criu
@pytest.mark.skipif(IS_GO_SHIM, reason="the Go shim says 'path= <file>' (no claim that it was kept)")
def test_crun_without_criu_checkpoint_error_names_no_missing_file(containerd, image, cid, hugetlb_v1):
    r, _ = _run_and_checkpoint(containerd, image, cid)
    assert r.returncode != 0, r.stdout
    dump_log = containerd.bundle_dir / cid / "criu-dump.log"
    assert f"kept as {dump_log}" not in r.stderr or dump_log.exists(), r.stderr


# -- the session's OCI runtime ------------------------------------------------------------------

@pytest.mark.skipif(RUNTIME != PY_RUNTIME, reason="the bundle's runtime file is this shim's")
def test_session_oci_runtime_is_applied(containerd, image, cid):
    """No explicit options: ctr gets $SHIM_RUNC_BINARY's (harness) and the shim runs that binary."""
    r = containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "300", check=False)
    assert r.returncode == 0, r.stderr
    wait_status(containerd, cid, "RUNNING")
    assert (containerd.bundle_dir / cid / "runtime").read_text() == oci_runtime_binary()
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(containerd, cid, "STOPPED")
    containerd.ctr("task", "rm", cid)
    containerd.ctr("containers", "rm", cid)
