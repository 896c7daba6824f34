"""Fixtures for the integration tests: one private containerd per session.

Fixtures:
  containerd  (session)  a started ``harness.Containerd`` with the busybox image imported
  image       (session)  the image ref (``docker.io/library/busybox:shimtest``)
  cid         (function) a unique container id for this test; cleaned up afterwards
  new_cid     (function) factory ``new_cid(tag="") -> str`` for more ids, all cleaned up
  crun_cgroups (session, autouse) with ``SHIM_RUNC_BINARY=crun`` only: hugetlb on cgroup v1
              for the whole session (``harness.hugetlb_on_v1``), undone at the end
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from integration.harness import (
    RUNC_BINARY_ENV,
    Containerd,
    HugetlbMountError,
    build_busybox_image,
    hugetlb_on_v1,
)

_SKIP_REASON: str | None = None
if os.geteuid() != 0:
    _SKIP_REASON = "integration tests need root (they run a private containerd and runc)"
elif shutil.which("containerd") is None or shutil.which("ctr") is None:
    _SKIP_REASON = "containerd/ctr not installed"
elif shutil.which("runc") is None:
    _SKIP_REASON = "runc not installed"
elif os.path.basename(os.environ.get(RUNC_BINARY_ENV, "")) == "crun" and shutil.which("crun") is None:
    _SKIP_REASON = f"{RUNC_BINARY_ENV}=crun but crun is not installed"

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if _SKIP_REASON is None:
        return
    marker = pytest.mark.skip(reason=_SKIP_REASON)
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(marker)


@pytest.fixture(scope="session", autouse=True)
def crun_cgroups():
    """With ``SHIM_RUNC_BINARY=crun``: hugetlb on cgroup v1 for the session, if crun needs it.

    Set up before the ``containerd`` fixture (autouse, session, requested
    first) and so torn down after it: by then every container, and so every
    hugetlb cgroup this session made, is gone and the v1 hierarchy can be
    released.  A mount that fails is a failure here, not a skip: the crun
    pass must not silently run nothing.
    """
    if _SKIP_REASON is not None or os.path.basename(os.environ.get(RUNC_BINARY_ENV, "")) != "crun":
        yield False
        return
    with contextlib.ExitStack() as stack:
        try:
            mounted = stack.enter_context(hugetlb_on_v1())
        except HugetlbMountError as e:
            pytest.fail(f"{RUNC_BINARY_ENV}=crun: {e}")
        yield mounted


@pytest.fixture(scope="session")
def containerd(crun_cgroups):
    if _SKIP_REASON is not None:
        pytest.skip(_SKIP_REASON)
    level = os.environ.get("SHIMTEST_CONTAINERD_LOG_LEVEL", "debug")
    c = Containerd(log_level=level)
    c.start()
    try:
        tar = c.dir / "busybox-oci.tar"
        ref = build_busybox_image(tar)
        c.import_image(tar)
        c.image_ref = ref
        yield c
    finally:
        log_tail = c.log_tail(60) if c.dir else ""
        report = c.stop()
        if report:
            sys.stderr.write(
                f"\n[integration harness] had to clean up after the session: {report}\n")
            if os.environ.get("SHIMTEST_SHOW_LOG"):
                sys.stderr.write(log_tail + "\n")


@pytest.fixture(scope="session")
def image(containerd) -> str:
    return containerd.image_ref


_counter = itertools.count(1)


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return s[:40].strip("-") or "t"


@pytest.fixture
def new_cid(request, containerd):
    """Factory of unique container ids; every id handed out is removed at teardown."""
    made: list[str] = []
    base = _sanitize(request.node.name)

    def make(tag: str = "") -> str:
        n = next(_counter)
        cid = f"{base}-{os.getpid()}-{n}" + (f"-{_sanitize(tag)}" if tag else "")
        made.append(cid)
        return cid

    yield make
    if containerd.proc is None or containerd.proc.poll() is not None:
        return
    tasks = containerd.tasks()
    containers = containerd.containers()
    for cid in made:
        if cid in tasks:
            containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
            containerd.ctr("task", "rm", "-f", cid, check=False)
        if cid in containers or cid in tasks:
            containerd.ctr("containers", "rm", cid, check=False)


@pytest.fixture
def cid(new_cid) -> str:
    """A unique container id for this test (removed afterwards if still present)."""
    return new_cid()


# -- fixtures for the direct (ttrpc) tests: integration/shim_driver.py --------------------

@pytest.fixture(scope="session")
def rootfs_template():
    """A busybox rootfs that Lab clones per bundle; runc namespace dirs it made are removed."""
    if shutil.which("runc") is None or not os.path.isfile("/usr/bin/busybox"):
        pytest.skip("runc or /usr/bin/busybox (busybox-static) not installed")
    from integration.shim_driver import make_rootfs_template, namespace_dirs

    preexisting = {str(d) for d in namespace_dirs() if d.exists()}
    tmp = Path(tempfile.mkdtemp(prefix="ptt-", dir="/tmp"))
    try:
        yield make_rootfs_template(tmp / "rootfs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in namespace_dirs():
            if str(d) not in preexisting:
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    pass


@pytest.fixture
async def lab(rootfs_template):
    """A Lab: bundles, an events sink and shims started as containerd would; all cleaned up."""
    import trio

    from integration.shim_driver import Lab

    async with trio.open_nursery() as nursery:
        lab = Lab(nursery, rootfs_template)
        try:
            yield lab
        finally:
            print(lab.all_logs())  # shown by pytest only when the test fails
            problems = lab.cleanup()
            nursery.cancel_scope.cancel()
        assert not problems, problems
