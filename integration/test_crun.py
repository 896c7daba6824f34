"""crun instead of runc, chosen the way containerd 1.6 lets ctr choose it for a
non-runc runtime type: ``ctr run --runtime-config-path FILE`` with a TOML
``BinaryName = "crun"``, which reaches the shim as ``runtimeoptions.v1.Options``.

crun 1.8 refuses a hybrid cgroup host while any controller is left on the
cgroup v2 (unified) hierarchy ("cgroups in hybrid mode not supported, drop
all controllers from cgroupv2"); on this VM that is hugetlb, which has no v1
mount. The module fixture ``hugetlb_v1`` mounts it on v1 (only if it is not
mounted already) and undoes exactly that afterwards. The negative test runs
first, before the mount, and only where crun would refuse.

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
import time
from pathlib import Path

import pytest

from integration.harness import (
    GO_RUNTIME,
    PY_RUNTIME,
    PY_SHIM_BINARY,
    RUNC_ROOT,
    pid_alive,
    wait_for,
)

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
IS_GO_SHIM = RUNTIME == GO_RUNTIME
CRUN = shutil.which("crun")
CGROUP_ROOT = Path("/sys/fs/cgroup")
HUGETLB = CGROUP_ROOT / "hugetlb"
UNIFIED = CGROUP_ROOT / "unified"
HYBRID_ERROR = "cgroups in hybrid mode not supported"
EXIT_CODE_RE = re.compile(r"exit with non-zero exit code (\d+)")

pytestmark = pytest.mark.skipif(CRUN is None, reason="crun not installed")


@pytest.fixture(autouse=True)
def _shim_installed(containerd):
    if RUNTIME == PY_RUNTIME and shutil.which(PY_SHIM_BINARY, path=containerd.env["PATH"]) is None:
        pytest.fail(f"{PY_SHIM_BINARY} not found on containerd's PATH ({containerd.env['PATH']})")


# -- the hugetlb v1 mount --------------------------------------------------------------

def hugetlb_mounted() -> bool:
    return os.path.ismount(HUGETLB)


def v2_controllers() -> list[str]:
    """Controllers enabled on the hybrid host's unified hierarchy (what crun objects to)."""
    try:
        return (UNIFIED / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def hybrid_host() -> bool:
    return os.path.ismount(UNIFIED) and not (CGROUP_ROOT / "cgroup.controllers").exists()


def crun_refuses_host() -> bool:
    """crun would refuse this host: hybrid, with hugetlb still on cgroup v2 and not on v1."""
    return hybrid_host() and not hugetlb_mounted() and "hugetlb" in v2_controllers()


def hugetlb_cgroup_count() -> int | None:
    """num_cgroups of hugetlb's hierarchy (/proc/cgroups), dying ones included."""
    for line in Path("/proc/cgroups").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "hugetlb":
            return int(fields[2])
    return None


def _remove_empty_cgroups(root: Path) -> list[str]:
    """rmdir every cgroup below ``root``, leaves first; return those still there (busy)."""
    dirs = sorted((Path(d) for d, _, _ in os.walk(root) if Path(d) != root),
                  key=lambda p: len(p.parts), reverse=True)
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()
    return [str(d) for d in dirs if d.exists()]


def _mount_hugetlb() -> None:
    subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(HUGETLB)],
                   check=True, capture_output=True, text=True)


def _umount_hugetlb() -> None:
    subprocess.run(["umount", str(HUGETLB)], check=True, capture_output=True, text=True)


def release_hugetlb_v1(timeout: float = 60.0) -> list[str]:
    """Unmount our hugetlb v1 mount so that its hierarchy really goes; return problems.

    The kernel destroys an unmounted v1 hierarchy only if it had no child
    cgroups at umount, dying ones included; otherwise it lingers (hugetlb stays
    off cgroup v2, its cgroups unreachable). While mounted, every runc/crun
    container on the host (other test sessions too) gets a hugetlb cgroup, so:
    remove the empty ones, wait until the kernel has released them and none is
    busy, unmount; if one slipped in meanwhile, mount again and repeat.
    """
    deadline = time.monotonic() + timeout
    busy: list[str] = []
    while True:
        busy = _remove_empty_cgroups(HUGETLB)
        if not busy and hugetlb_cgroup_count() == 1:
            _umount_hugetlb()
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: "hugetlb" in v2_controllers(), timeout=2, interval=0.05,
                         message="hugetlb back on cgroup v2")
                return []
            _mount_hugetlb()  # a cgroup appeared between the check and the umount
            continue
        if time.monotonic() >= deadline:
            _umount_hugetlb()
            return [f"hugetlb v1 hierarchy left behind: busy cgroups {busy}, "
                    f"{hugetlb_cgroup_count()} cgroups in /proc/cgroups"]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def hugetlb_v1():
    """hugetlb on cgroup v1 at /sys/fs/cgroup/hugetlb for the module, if crun needs it.

    Mounted only if /sys/fs/cgroup/hugetlb is not a mount yet (and crun would
    refuse the host); undone at the end by ``release_hugetlb_v1``, and the
    directory removed if we created it.
    """
    if hugetlb_mounted() or not crun_refuses_host():
        yield False  # already on v1, or not a hybrid host with hugetlb on v2
        return
    created_dir = not HUGETLB.exists()
    HUGETLB.mkdir(exist_ok=True)
    try:
        _mount_hugetlb()
    except subprocess.CalledProcessError as e:
        if created_dir:
            HUGETLB.rmdir()
        pytest.skip(f"cannot mount hugetlb on cgroup v1: {e.stderr.strip()}")
    try:
        yield True
    finally:
        problems = release_hugetlb_v1()
        if created_dir:
            HUGETLB.rmdir()
        assert not problems, problems


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
        pytest.skip("crun accepts this host's cgroups as they are (hugetlb already on v1, or not hybrid)")
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, *crun_args(containerd), image, cid, "true",
                       check=False)
    assert r.returncode != 0, r.stdout
    assert HYBRID_ERROR in r.stderr, r.stderr
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
