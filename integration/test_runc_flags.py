"""runc options (containerd.runc.v1.Options) reach runc as the right flags.

Driven over ttrpc like containerd, with a ``BinaryName`` that records each
runc invocation and then runs the real runc (RuncSpy), so the containers
are real and the flags are checked at the source.
"""

from __future__ import annotations

import os

from google.protobuf import any_pb2

from integration.test_checkpoint import RUNC_OPTIONS_TYPE, RuncSpy, _flag
from shim.proto import runc_options_pb2


def options_any(**fields) -> any_pb2.Any:
    return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE, value=runc_options_pb2.Options(**fields).SerializeToString())


async def test_root_no_pivot_no_new_keyring_and_criu_reach_runc(lab) -> None:
    await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    cid = lab.new_id("flags")
    bundle = lab.bundle(cid, ["sh", "-c", "exit 7"])
    root = lab.tmp / "runc-root"
    shim = await lab.start_shim(cid, bundle)
    options = options_any(
        binary_name=str(spy.path), root=str(root), no_pivot_root=True, no_new_keyring=True, criu_path="/usr/sbin/criu"
    )
    created = await shim.create(cid, bundle, options=options)
    create = spy.call("create")
    assert _flag(create, "--root") == str(root / "ptest")  # Root plus the namespace, as the Go shim
    assert _flag(create, "--criu") == "/usr/sbin/criu"
    assert "--no-pivot" in create and "--no-new-keyring" in create
    assert _flag(create, "--pid-file") == str(bundle / "init.pid")
    assert os.path.isdir(root / "ptest" / cid), "runc kept its state under the custom root"
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 7
    deleted = await shim.delete(cid)
    assert deleted.pid == created.pid
    assert _flag(spy.call("delete"), "--root") == str(root / "ptest")
    assert not os.path.exists(root / "ptest" / cid)
    assert (bundle / "runtime").read_text() == str(spy.path)  # what the delete action will use
    await shim.shutdown(cid)


async def test_systemd_cgroup_flag_reaches_runc(lab) -> None:
    await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    cid = lab.new_id("systemd")
    bundle = lab.bundle(cid, ["true"])
    shim = await lab.start_shim(cid, bundle)
    try:
        await shim.create(cid, bundle, options=options_any(binary_name=str(spy.path), systemd_cgroup=True))
    except Exception as e:  # no systemd here: runc refuses, and says why
        assert "systemd" in str(e).lower() or "dbus" in str(e).lower(), e
    assert "--systemd-cgroup" in spy.call("create")
    await shim.shutdown(cid, now=True)
