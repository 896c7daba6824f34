"""The real ``start`` action, run the way each containerd release runs it.

Only containerd 1.6.20 is installed here, so each release is played by the
test: its flags, environment and stdin (rebuilt from its ``Command``, see
tests/test_bootstrap.py and shim/proto/BOOTSTRAP.md), then its reading of the
answer (its ``parseStartResponse``). Then we connect to the address that
release would dial, call Task/Connect, Shutdown(now) and check the shim is
gone with its socket. Needs root (/run/containerd/s). Everything created here
(temp dir, socket, shim process) is removed by path / pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from integration.harness import PROJECT_BIN, pid_alive
from shim.launch.grouping import socket_path
from shim.proto import bootstrap_pb2, runc_options_pb2, shim_pb2
from shim.ttrpc import Code, TTRPCError, open_client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="start binds in /run/containerd/s: needs root")

SHIM = str(PROJECT_BIN / "containerd-shim-runc-v2-py")
NAMESPACE = "bstest"
CONTAINERD_BIN = "/usr/bin/containerd"
TASK_V2 = "containerd.task.v2.Task"
TASK_V3 = "containerd.task.v3.Task"
RUNC_OPTS = any_pb2.Any(
    type_url="containerd.runc.v1.Options",
    value=runc_options_pb2.Options(binary_name="runc").SerializeToString(),
).SerializeToString()
GO_SPACE = b" \t\n\v\f\r"  # bytes.TrimSpace's ASCII set


# -- how each containerd reads the answer ------------------------------------------


def read_1_6(out: bytes) -> tuple[int, str, str]:
    """v1.6.20 runtime/v2/binary.go: strings.TrimSpace(CombinedOutput) is the address."""
    return 2, out.strip(GO_SPACE).decode(), "ttrpc"


def _read_legacy(out: bytes, max_version: int) -> tuple[int, str, str]:
    """v1.7.0 runtime/v2/shim.go, v2.0.0 core/runtime/v2/shim.go parseStartResponse."""
    out = out.strip(GO_SPACE)
    try:
        params = json.loads(out)
    except ValueError:
        params = None
    if not isinstance(params, dict) or params.get("version", 0) < 2:
        return 2, out.decode(), "ttrpc"
    if params["version"] > max_version:
        raise ValueError(f"unsupported shim version ({params['version']})")
    return params["version"], params["address"], params["protocol"]


def read_1_7(out: bytes) -> tuple[int, str, str]:
    return _read_legacy(out, 2)


def read_2_0(out: bytes) -> tuple[int, str, str]:
    return _read_legacy(out, 3)  # CurrentShimVersion = 3


def read_2_3(out: bytes) -> tuple[int, str, str]:
    """v2.3.0 core/runtime/v2/binary.go + shim.go: trimmed, protobuf first, then legacy."""
    try:
        result = bootstrap_pb2.BootstrapResult.FromString(out.strip(GO_SPACE))
    except DecodeError:
        return _read_legacy(out, 3)
    return result.version, result.address, result.protocol


# -- each release's invocation -------------------------------------------------------


@dataclass
class Release:
    name: str
    env: Callable[[str, str], dict[str, str]]  # (grpc, ttrpc) -> containerd's additions
    stdin: Callable[[str, str, str, str, str], bytes]  # (id, ns, grpc, ttrpc, socket_dir)
    read: Callable[[bytes], tuple[int, str, str]]
    version: int  # what that containerd should end up with
    debug: bool = False
    own_socket_dir: bool = False  # 2.3: BootstrapParams.socket_dir


def env_1_6(grpc: str, ttrpc: str) -> dict[str, str]:
    # SHIM_PY_TEMPLATE=0: these tests are about start's output, not the warm template.
    return {"GOMAXPROCS": "2", "TTRPC_ADDRESS": ttrpc, "SHIM_PY_TEMPLATE": "0"}


def env_1_7(grpc: str, ttrpc: str) -> dict[str, str]:
    # 1.7 runtime/v2/shim/util.go; 2.0-2.3 pkg/shim/util.go (MAX_SHIM_VERSION is always 2)
    return {**env_1_6(grpc, ttrpc), "MAX_SHIM_VERSION": "2", "GRPC_ADDRESS": grpc, "NAMESPACE": NAMESPACE}


def env_v3(grpc: str, ttrpc: str) -> dict[str, str]:
    return {**env_1_7(grpc, ttrpc), "MAX_SHIM_VERSION": "3"}  # no release sends this yet


def options_stdin(*_: str) -> bytes:
    return RUNC_OPTS


def bootstrap_stdin(id: str, ns: str, grpc: str, ttrpc: str, socket_dir: str) -> bytes:
    params = bootstrap_pb2.BootstrapParams(
        instance_id=id,
        namespace=ns,
        log_level=bootstrap_pb2.LOG_LEVEL_DEBUG,
        containerd_version="2.3.0",
        containerd_grpc_address=grpc,
        containerd_ttrpc_address=ttrpc,
        containerd_binary=CONTAINERD_BIN,
        extensions=[bootstrap_pb2.Extension(value=any_pb2.Any.FromString(RUNC_OPTS))],
        socket_dir=socket_dir,
    )
    return params.SerializeToString()


RELEASES = [
    Release("1.6", env_1_6, options_stdin, read_1_6, version=2),
    Release("1.6-no-options", env_1_6, lambda *_: b"", read_1_6, version=2),
    Release("1.7", env_1_7, options_stdin, read_1_7, version=2),
    Release("2.0", env_1_7, options_stdin, read_2_0, version=2, debug=True),
    Release("2.3", env_1_7, bootstrap_stdin, read_2_3, version=2, debug=True, own_socket_dir=True),
    Release("v3-offered", env_v3, options_stdin, read_2_0, version=3),
]


@dataclass
class Started:
    id: str
    path: str  # the socket that release would dial
    version: int
    stdout: bytes


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # only if it happens to be ours
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def started(release: Release) -> Iterator[tuple[Started, list[int]]]:
    """Run ``start`` as ``release`` would; yield what it printed and a list to put
    the shim's pid in. Afterwards kill that pid if still alive, remove the socket
    and the temp dir."""
    tmp = tempfile.mkdtemp(prefix="shimbs-", dir="/tmp")
    pids: list[int] = []
    path = ""
    try:
        bundle = os.path.join(tmp, "bundle")
        os.mkdir(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as f:  # containerd always writes one
            f.write('{"ociVersion": "1.0.2", "annotations": {}}')
        grpc = os.path.join(tmp, "containerd.sock")  # unique: so is the socket's hash
        ttrpc = grpc + ".ttrpc"
        id = f"bs-{release.name}-{secrets.token_hex(3)}"
        socket_dir = os.path.join(tmp, "s")
        argv = ["-namespace", NAMESPACE, "-address", grpc, "-publish-binary", CONTAINERD_BIN, "-id", id]
        argv += ["-debug"] if release.debug else []
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **release.env(grpc, ttrpc)}
        stdin = release.stdin(id, NAMESPACE, grpc, ttrpc, socket_dir)
        path = socket_path(grpc, NAMESPACE, id, socket_dir) if release.own_socket_dir else socket_path(grpc, NAMESPACE, id)
        proc = subprocess.run(
            [SHIM, *argv, "start"], input=stdin, cwd=bundle, env=env, capture_output=True, timeout=30
        )
        assert proc.stderr == b"", proc.stderr  # containerd reads stdout+stderr together
        assert proc.returncode == 0
        version, address, protocol = release.read(proc.stdout)
        assert (version, protocol) == (release.version, "ttrpc")
        assert address == "unix://" + path
        with open(os.path.join(bundle, "address")) as f:
            assert f.read() == address
        yield Started(id, path, version, proc.stdout), pids
    finally:
        for pid in pids:
            if not _wait_gone(pid, 0) and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(tmp, ignore_errors=True)


async def call(client, service: str, method: str, request, response_type):
    return response_type.FromString(await client.call(service, method, request.SerializeToString(), timeout=10))


async def connect_and_shutdown(s: Started, pids: list[int]) -> None:
    async with open_client(s.path) as client:
        resp = await call(client, TASK_V2, "Connect", shim_pb2.ConnectRequest(id=s.id), shim_pb2.ConnectResponse)
        pids.append(resp.shim_pid)
        assert pid_alive(resp.shim_pid) and resp.task_pid == 0
        with contextlib.suppress(ConnectionError):  # the shim may be gone before it answers
            await client.call(TASK_V2, "Shutdown", shim_pb2.ShutdownRequest(id=s.id, now=True).SerializeToString(), timeout=10)
    assert _wait_gone(resp.shim_pid), "shim did not exit after Shutdown(now)"
    assert not os.path.exists(s.path), "shim left its socket behind"


@pytest.mark.parametrize("release", RELEASES, ids=[r.name for r in RELEASES])
async def test_start_as_each_containerd(release: Release) -> None:
    with started(release) as (s, pids):
        if release.name.startswith("1.6"):
            assert s.stdout.startswith(b"unix:///run/containerd/s/")
        elif release.name == "2.3":
            assert s.stdout.startswith(b"\x08\x02\x12")  # BootstrapResult{version: 2, address: ...}
        else:
            assert s.stdout.startswith(b'{"version":%d,' % release.version)
        await connect_and_shutdown(s, pids)


async def test_v3_task_service_on_the_same_socket() -> None:
    release = next(r for r in RELEASES if r.name == "v3-offered")
    with started(release) as (s, pids):
        async with open_client(s.path) as client:
            v2 = await call(client, TASK_V2, "Connect", shim_pb2.ConnectRequest(id=s.id), shim_pb2.ConnectResponse)
            pids.append(v2.shim_pid)
            try:
                v3 = await call(client, TASK_V3, "Connect", shim_pb2.ConnectRequest(id=s.id), shim_pb2.ConnectResponse)
            finally:
                with contextlib.suppress(ConnectionError, TTRPCError):
                    await client.call(TASK_V2, "Shutdown", shim_pb2.ShutdownRequest(id=s.id, now=True).SerializeToString(), timeout=10)
        assert v3.shim_pid == v2.shim_pid
        assert _wait_gone(v2.shim_pid)


async def test_v3_absent_is_unimplemented_not_a_crash() -> None:
    """Until v3 is registered, asking for it must fail cleanly and leave v2 working."""
    release = next(r for r in RELEASES if r.name == "v3-offered")
    with started(release) as (s, pids):
        async with open_client(s.path) as client:
            try:
                await client.call(TASK_V3, "Connect", shim_pb2.ConnectRequest(id=s.id).SerializeToString(), timeout=10)
            except TTRPCError as e:
                assert e.code == Code.UNIMPLEMENTED
        await connect_and_shutdown(s, pids)
