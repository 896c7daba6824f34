"""Rootfs mounts containerd hands the shim that need more than one mount(2) call as given.

- An image of 64 layers: the overlay's lowerdir option (63 snapshot paths under the
  private containerd's root) is longer than a page, and mount(2) refuses it with EINVAL
  unless the shim shortens it, as containerd's mount package does for the Go shim.
- A ``loop`` mount (a filesystem image file): the shim attaches a loop device, and the
  kernel frees it at unmount.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import trio

from integration.harness import GO_RUNTIME, PY_RUNTIME, build_busybox_image, mounts_under
from integration.shim_driver import Lab
from shim.proto import mount_pb2

LAYERS = 64


@pytest.mark.parametrize("runtime", [PY_RUNTIME, GO_RUNTIME])
def test_an_image_of_64_layers_runs(containerd, new_cid, runtime):
    ref = f"docker.io/library/layers64:{os.getpid()}"
    tar = containerd.dir / "layers64.tar"
    if not tar.exists():
        build_busybox_image(tar, ref=ref, extra_layers=LAYERS - 1)
        containerd.import_image(tar)
    cid = new_cid("layers")
    mounts_before = sorted(mounts_under(containerd.dir))
    r = containerd.ctr("run", "--rm", "--runtime", runtime, ref, cid, "sh", "-c",
                       f"cat /layers/1 /layers/{LAYERS - 1}; ls /layers | wc -l", check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", str(LAYERS - 1), str(LAYERS - 1)]
    assert sorted(mounts_under(containerd.dir)) == mounts_before


def _loop_devices() -> set[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or not os.path.exists("/dev/loop-control"),
                    reason="needs mkfs.ext4 and loop devices")
async def test_a_loop_mount_rootfs_runs_and_its_device_is_freed(lab: Lab) -> None:
    cid = lab.new_id("loop")
    tree = lab.busybox_dir()
    (tree / "marker").write_text("from the image file\n")
    image = lab.tmp / "rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "32M"], check=True)
    bundle = lab.bundle(cid, ["sh", "-c", 'test "$(cat /marker)" = "from the image file" && exit 7'],
                        rootfs="empty")
    loops_before = _loop_devices()
    shim = await lab.start_shim(cid, bundle)
    mount = mount_pb2.Mount(type="ext4", source=str(image), options=["loop", "ro"])
    await shim.create(cid, bundle, rootfs=[mount])
    assert str(bundle / "rootfs") in mounts_under(bundle / "rootfs")
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 7  # the container read the file system in the image
    await shim.delete(cid)
    assert mounts_under(lab.tmp) == []
    with trio.fail_after(10):
        while _loop_devices() - loops_before:  # autoclear: the kernel frees it at the unmount
            await trio.sleep(0.05)
    await shim.shutdown(cid)
