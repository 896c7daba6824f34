"""User-namespace pods (containerd 2.x, Kubernetes ``hostUsers: false``): rootfs mounts with
``uidmap=``/``gidmap=`` options, through the direct ttrpc driver (containerd 1.6's CRI never
sends them).

The pod runs in a user namespace mapping container 0..65535 to host 65536..131071 (the OCI
spec's ``linux.uidMappings``), and containerd asks for the image's layers to be ID-mapped the
same way: a file the image owns as root must be root inside the pod, 65536 seen from the
host, and what the pod writes lands in the upperdir as 65536 (containerd's snapshotter
chowns the upperdir to the mapped root, as done here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from integration.harness import mounts_under
from integration.shim_driver import Lab, expect_error
from shim.proto import mount_pb2
from shim.ttrpc import Code

HOST_ID = 65536
MAPPING = f"0:{HOST_ID}:65536"
MAP_OPTIONS = [f"uidmap={MAPPING}", f"gidmap={MAPPING}"]
#: what the container reports: owner of an image file, of a busybox file, of its own new file
REPORT = "stat -c %u:%g /image-file /bin/busybox > /seen && echo new > /written && stat -c %u:%g /written >> /seen"

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the shim's syscall numbers are x86_64's")


def userns_bundle(lab: Lab, cid: str, args: list[str]) -> Path:
    """A bundle whose container runs in a user namespace with the pod's mapping, its rootfs
    left to the Create's mounts. The dirs above the rootfs are opened to others (0711, as
    containerd's are): the container's root is host uid 65536."""
    bundle = lab.bundle(cid, args, rootfs="empty")
    config = json.loads((bundle / "config.json").read_text())
    linux = config["linux"]
    linux["namespaces"].append({"type": "user"})
    linux["uidMappings"] = linux["gidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": 65536}]
    (bundle / "config.json").write_text(json.dumps(config))
    for path in (lab.tmp, bundle):
        path.chmod(0o711)
    return bundle


def image_layer(lab: Lab) -> Path:
    """A layer on top of busybox: a root-owned file and dir, as an image has them."""
    layer = lab.tmp / "layer-top"
    (layer / "image-dir").mkdir(parents=True)
    (layer / "image-file").write_text("from the image\n")
    for path in (layer, layer / "image-dir", layer / "image-file"):
        os.chown(path, 0, 0)
    return layer


def snapshot_dirs(lab: Lab) -> tuple[Path, Path]:
    upper, work = lab.tmp / "upper", lab.tmp / "work"
    upper.mkdir()
    work.mkdir()
    os.chown(upper, HOST_ID, HOST_ID)  # containerd's overlay snapshotter: the mapped root pair
    return upper, work


def overlay(lowers: list[Path], upper: Path, work: Path, extra: list[str]) -> mount_pb2.Mount:
    lowerdir = ":".join(str(p) for p in lowers)
    return mount_pb2.Mount(type="overlay", source="overlay",
                           options=[f"workdir={work}", f"upperdir={upper}", f"lowerdir={lowerdir}", *extra])


def shim_children(shim_pid: int, *known: int) -> list[str]:
    """Processes whose parent is the shim, but ``known`` (a leftover namespace holder would be one)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == shim_pid and int(entry.name) not in known:
                out.append(f"{entry.name} {stat[:stat.rindex(')') + 1]} {fields[0]}")
    return out


def scratch_dirs(bundle: Path) -> list[str]:
    return [p.name for p in bundle.iterdir() if p.name.startswith(".idmapped-")]


async def test_an_id_mapped_overlay_shows_the_image_as_root_inside_and_as_the_mapped_id_outside(lab: Lab) -> None:
    cid = lab.new_id("idmap")
    bundle = userns_bundle(lab, cid, ["sh", "-c", REPORT])
    upper, work = snapshot_dirs(lab)
    rootfs = overlay([image_layer(lab), lab.busybox_dir()], upper, work, MAP_OPTIONS)
    shim = await lab.start_shim(cid, bundle)
    init = (await shim.create(cid, bundle, rootfs=[rootfs])).pid
    # from the host, through the mapped layers: the image's root is the mapped id
    seen_from_host = bundle / "rootfs" / "image-file"
    assert (seen_from_host.stat().st_uid, seen_from_host.stat().st_gid) == (HOST_ID, HOST_ID)
    assert (bundle / "rootfs" / "image-dir").stat().st_uid == HOST_ID
    # the layers on disk are untouched, the scratch copies are gone, the holder is reaped
    assert (lab.tmp / "layer-top" / "image-file").stat().st_uid == 0
    assert mounts_under(lab.tmp) == [str(bundle / "rootfs")]
    assert scratch_dirs(bundle) == []
    assert shim_children(shim.pid, init) == []
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 0, lab.shim_log(bundle)
    # inside the pod: root; written into the upperdir as the mapped id
    assert (upper / "seen").read_text().split() == ["0:0", "0:0", "0:0"]
    written = (upper / "written").stat()
    assert (written.st_uid, written.st_gid) == (HOST_ID, HOST_ID)
    await shim.delete(cid)
    assert mounts_under(lab.tmp) == []
    assert scratch_dirs(bundle) == []
    assert shim_children(shim.pid) == []
    await shim.shutdown(cid)


async def test_an_id_mapped_bind_keeps_the_ids_on_disk(lab: Lab) -> None:
    """A single-layer snapshot is a bind mount with the mapping: the pod sees the directory's
    root-owned files as root and what it writes is stored as root again (ID-mapped both ways)."""
    cid = lab.new_id("idbind")
    bundle = userns_bundle(lab, cid, ["sh", "-c", REPORT])
    tree = lab.busybox_dir()
    (tree / "image-file").write_text("from the image\n")
    shim = await lab.start_shim(cid, bundle)
    await shim.create(cid, bundle, rootfs=[mount_pb2.Mount(type="bind", source=str(tree),
                                                           options=["rbind", "rw", *MAP_OPTIONS])])
    assert (bundle / "rootfs" / "image-file").stat().st_uid == HOST_ID
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 0, lab.shim_log(bundle)
    assert (tree / "seen").read_text().split() == ["0:0", "0:0", "0:0"]
    assert (tree / "written").stat().st_uid == 0
    await shim.delete(cid)
    assert mounts_under(lab.tmp) == []
    assert shim_children(shim.pid) == []
    await shim.shutdown(cid)


@pytest.mark.parametrize("bad", ["uidmap=0:65536", "uidmap=zero:65536:65536", "uidmap=0:65536:0"])
async def test_a_malformed_mapping_is_invalid_argument_and_the_shim_serves_on(lab: Lab, bad: str) -> None:
    cid = lab.new_id("badmap")
    bundle = userns_bundle(lab, cid, ["true"])
    upper, work = snapshot_dirs(lab)
    shim = await lab.start_shim(cid, bundle)
    rootfs = overlay([lab.busybox_dir()], upper, work, [bad, f"gidmap={MAPPING}"])
    await expect_error(Code.INVALID_ARGUMENT, shim.create(cid, bundle, rootfs=[rootfs]), contains=bad.split("=")[1])
    assert mounts_under(lab.tmp) == []
    await expect_error(Code.NOT_FOUND, shim.state(cid))  # the shim answers; nothing was created
    await shim.shutdown(cid)


async def test_a_failure_half_way_leaves_no_mount_no_scratch_dir_and_no_holder(lab: Lab) -> None:
    """The first layer gets its mapped copy, the second does not exist: the copy made so far,
    the scratch directory and the namespace holder all go."""
    cid = lab.new_id("idfail")
    bundle = userns_bundle(lab, cid, ["true"])
    upper, work = snapshot_dirs(lab)
    shim = await lab.start_shim(cid, bundle)
    rootfs = overlay([lab.busybox_dir(), lab.tmp / "no-such-layer"], upper, work, MAP_OPTIONS)
    await expect_error(Code.UNKNOWN, shim.create(cid, bundle, rootfs=[rootfs]), contains="no-such-layer")
    assert mounts_under(lab.tmp) == []
    assert scratch_dirs(bundle) == []
    assert shim_children(shim.pid) == []
    await shim.shutdown(cid)
