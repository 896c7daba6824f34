"""runc options (containerd.runc.v1.Options) reach runc as the right flags.

Driven over ttrpc like containerd, with a ``BinaryName`` that records each
invocation and then runs the session's real OCI runtime (RuncSpy: runc, or
crun under ``SHIM_RUNC_BINARY=crun``), so the containers are real and the
flags are checked at the source.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import trio
from google.protobuf import any_pb2

from integration.harness import pid_alive
from integration.shim_driver import RUNC_ROOT
from integration.test_checkpoint import RUNC_OPTIONS_TYPE, RuncSpy, _flag
from shim.proto import runc_options_pb2
from shim.ttrpc import Code, TTRPCError

#: runc's global --criu names the criu binary it execs; crun links libcriu and has no such flag
#: ("unrecognized option '--criu'"), so with crun CriuPath is left empty and must not appear.
CRIU_FLAG_RUNTIMES = {"runc"}
#: what each runtime says to --systemd-cgroup on a host whose init is not systemd
NO_SYSTEMD_ERROR = {
    "runc": "systemd not running on this host, cannot use systemd cgroups manager",
    "crun": "cannot open sd-bus",
}


def options_any(**fields) -> any_pb2.Any:
    return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE, value=runc_options_pb2.Options(**fields).SerializeToString())


def systemd_booted() -> bool:
    """sd_booted(): systemd is the init system (what runc/crun need for --systemd-cgroup)."""
    return os.path.isdir("/run/systemd/system")


async def test_root_no_pivot_no_new_keyring_and_criu_reach_runc(lab) -> None:
    await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    criu = "/usr/sbin/criu" if os.path.basename(spy.runtime) in CRIU_FLAG_RUNTIMES else ""
    cid = lab.new_id("flags")
    bundle = lab.bundle(cid, ["sh", "-c", "exit 7"])
    root = lab.tmp / "runc-root"
    shim = await lab.start_shim(cid, bundle)
    options = options_any(
        binary_name=str(spy.path), root=str(root), no_pivot_root=True, no_new_keyring=True, criu_path=criu
    )
    created = await shim.create(cid, bundle, options=options)
    create = spy.call("create")
    assert _flag(create, "--root") == str(root / "ptest")  # Root plus the namespace, as the Go shim
    assert _flag(create, "--criu") == (criu or None)
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
    """SystemdCgroup becomes the runtime's --systemd-cgroup, as in the Go shim; what happens
    then is the runtime's business, and the shim reports it: on a host without systemd
    the runtime refuses the container (and nothing of it is left), with systemd it creates
    the container in a transient scope named after the slice:prefix:name cgroupsPath."""
    await lab.start_sink()
    spy = RuncSpy(lab.tmp)
    cid = lab.new_id("systemd")
    bundle = lab.bundle(cid, ["true"])
    # the systemd driver wants slice:prefix:name (runc refuses "/ptest/<id>" before trying systemd)
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["cgroupsPath"] = f"system.slice:ptest:{cid}"
    (bundle / "config.json").write_text(json.dumps(config))
    shim = await lab.start_shim(cid, bundle)
    options = options_any(binary_name=str(spy.path), systemd_cgroup=True)
    if systemd_booted():
        created = await shim.create(cid, bundle, options=options)
        assert f"ptest-{cid}.scope" in Path(f"/proc/{created.pid}/cgroup").read_text()
        await shim.kill(cid, signal.SIGKILL)
        await shim.wait(cid)
        await shim.delete(cid)
    else:
        try:
            await shim.create(cid, bundle, options=options)
        except TTRPCError as e:
            err = e
        else:
            raise AssertionError(f"{spy.runtime} --systemd-cgroup created a container on a host without systemd")
        assert err.code == Code.UNKNOWN, err
        # the runtime's own words, passed through
        assert NO_SYSTEMD_ERROR[os.path.basename(spy.runtime)] in err.message, err.message
        assert err.message.startswith("OCI runtime create failed"), err.message
        # the failed create left nothing: no task in the shim, no container in the runtime
        try:
            await shim.state(cid)
        except TTRPCError as e:
            assert e.code == Code.NOT_FOUND, e
        else:
            raise AssertionError("a failed Create left its task behind")
        state = await trio.run_process([spy.runtime, "--root", RUNC_ROOT, "state", cid], check=False,
                                       capture_stdout=True, capture_stderr=True)
        assert state.returncode != 0, state.stdout
        assert not os.path.exists(os.path.join(RUNC_ROOT, cid))
    assert "--systemd-cgroup" in spy.call("create")
    assert (await shim.connect(cid)).shim_pid == shim.pid and pid_alive(shim.pid)
    await shim.shutdown(cid, now=True)
