"""Sanity checks of the harness itself, using the reference Go shim."""

import shutil

import pytest

from integration.harness import GO_RUNTIME

pytestmark = pytest.mark.skipif(shutil.which("containerd-shim-runc-v2") is None,
                                reason="Go shim containerd-shim-runc-v2 not installed")


def test_go_shim_echo_hello(containerd, image, cid):
    r = containerd.ctr("run", "--rm", "--runtime", GO_RUNTIME, image, cid, "echo", "hello")
    assert r.stdout == "hello\n"
    assert cid not in containerd.containers()


def test_go_shim_exit_code(containerd, image, cid):
    r = containerd.ctr("run", "--rm", "--runtime", GO_RUNTIME, image, cid,
                       "sh", "-c", "exit 3", check=False)
    assert r.returncode == 3, r.stderr
    assert cid not in containerd.containers()
