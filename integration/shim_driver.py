"""Drive the Python shim over ttrpc the way containerd 1.6 does, with the
test playing containerd: bundles on disk, an events sink serving
``containerd.services.events.ttrpc.v1.Events/Forward``, the ``start`` and
``delete`` actions run as containerd runs them, and ``containerd.task.v2.Task``
called over the shim's socket.

Everything a ``Lab`` creates (tmp dir, shims, containers, mounts, sockets) is
tracked and removed by ``Lab.cleanup`` -- by pid / id / path, never by name.

The OCI runtime is the session's, as in the ctr tests: with
``SHIM_RUNC_BINARY=crun`` every ``start`` (stdin) and ``Create`` (options)
carries ``containerd.runc.v1.Options{binary_name: "crun"}``, exactly what
containerd sends for a runc runtime type configured with ``BinaryName``;
without it nothing is sent, as ctr 1.6 sends nothing, and the shim uses runc.
A test that passes its own ``options`` to ``create`` chooses for itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2
from google.protobuf.message import Message

from integration.harness import (
    EVENTUALLY,
    PROJECT_BIN,
    RUNC_BINARY_ENV,
    _busybox_applets,
    mounts_under,
    pid_alive,
    read_cmdline,
    shim_pids,
    umount_lazy,
    unix_socket_holders,
)
from shim.proto import events_pb2, events_service_pb2, runc_options_pb2, shim_pb2
from shim.ttrpc import CallContext, Client, Server, TTRPCError, open_client

NAMESPACE = "ptest"
SHIM_BINARY = str(PROJECT_BIN / "containerd-shim-runc-v2-py")
PUBLISH_BINARY = "/usr/bin/containerd"
RUNC_ROOT = f"/run/containerd/runc/{NAMESPACE}"
SHIM_SOCKET_DIR = "/run/containerd/s"
TASK_SERVICE = "containerd.task.v2.Task"
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_HEADER = "containerd-namespace-ttrpc"
BUSYBOX = "/usr/bin/busybox"
CGROUP_ROOT = Path("/sys/fs/cgroup")
ADDRESS_RE = re.compile(r"unix:///run/containerd/s/[0-9a-f]{64}")
#: the type URL containerd's typeurl gives runc's options (a bare name, no type.googleapis.com/)
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"

_ids = itertools.count(1)


# -- small helpers ------------------------------------------------------------

def oci_runtime() -> str:
    """The OCI runtime binary the direct tests run: ``$SHIM_RUNC_BINARY`` (a name or a path), else runc."""
    return os.environ.get(RUNC_BINARY_ENV, "") or "runc"


def runc_options(**fields) -> any_pb2.Any:
    """``containerd.runc.v1.Options`` as containerd puts it in CreateTaskRequest.options (and on start's stdin)."""
    return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE,
                       value=runc_options_pb2.Options(**fields).SerializeToString())


def session_options() -> any_pb2.Any | None:
    """The runtime options every Lab sends by default: BinaryName = $SHIM_RUNC_BINARY, or none."""
    binary = os.environ.get(RUNC_BINARY_ENV, "")
    return runc_options(binary_name=binary) if binary else None


def socket_path_for(containerd_address: str, namespace: str, id: str) -> str:
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, id).encode()).hexdigest()
    return os.path.join(SHIM_SOCKET_DIR, digest)


def listening_pids(path: str) -> set[int]:
    """Pids holding the listening unix socket bound at ``path``."""
    return unix_socket_holders([path], listening=True)[path]


def in_container_cgroup(pid: int, id: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return any(line.endswith(f"/{NAMESPACE}/{id}") for line in text.splitlines())


def thp_disabled(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("THP_enabled:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


async def wait_until(predicate, timeout: float = EVENTUALLY, interval: float = 0.05, message: str = "condition"):
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {message}")


def make_rootfs_template(dest: Path) -> Path:
    """A minimal busybox rootfs: bin/busybox + applet symlinks, proc sys dev tmp."""
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in _busybox_applets(BUSYBOX):
        link = dest / "bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")
    return dest


def clone_rootfs(template: Path, dest: Path) -> None:
    """Copy the template (hard-linking busybox when on the same filesystem)."""
    dest.mkdir(parents=True)
    for entry in template.iterdir():
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            target.mkdir()
            for sub in entry.iterdir():
                if sub.is_symlink():
                    (target / sub.name).symlink_to(os.readlink(sub))
                else:
                    try:
                        os.link(sub, target / sub.name)
                    except OSError:
                        shutil.copy2(sub, target / sub.name)


def runc_spec(bundle: Path, id: str, args: list[str]) -> dict:
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    path = bundle / "config.json"
    spec = json.loads(path.read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = list(args)
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["hostname"] = "ptest"
    spec["linux"]["cgroupsPath"] = f"/{NAMESPACE}/{id}"  # what containerd would set
    path.write_text(json.dumps(spec, indent=2))
    return spec


# -- events sink ----------------------------------------------------------------

@dataclass
class Recorded:
    topic: str
    type_url: str
    event: Message | None
    namespace: str  # envelope.namespace
    metadata: dict[str, list[str]]
    received_at: float


def decode_event(type_url: str, value: bytes) -> Message | None:
    prefix = "containerd.events."
    if not type_url.startswith(prefix):
        return None
    cls = getattr(events_pb2, type_url[len(prefix):], None)
    return cls.FromString(value) if cls is not None else None


class EventSink:
    """containerd's ttrpc events endpoint (TTRPC_ADDRESS), recording in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.events: list[Recorded] = []
        self.changed = trio.Event()
        self._scope: trio.CancelScope | None = None

    async def _forward(self, payload: bytes, ctx: CallContext) -> bytes:
        req = events_service_pb2.ForwardRequest.FromString(payload)
        env = req.envelope
        self.events.append(Recorded(
            topic=env.topic,
            type_url=env.event.type_url,
            event=decode_event(env.event.type_url, env.event.value),
            namespace=env.namespace,
            metadata=dict(ctx.metadata),
            received_at=time.monotonic(),
        ))
        self.changed.set()
        self.changed = trio.Event()
        return b""  # google.protobuf.Empty

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        server = Server()
        server.register(EVENTS_SERVICE, "Forward", self._forward)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
            sock.listen(16)
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve, sock)
                    task_status.started()
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def topics(self) -> list[str]:
        return [e.topic for e in self.events]

    async def wait_count(self, n: int, timeout: float = EVENTUALLY) -> list[Recorded]:
        with trio.move_on_after(timeout):
            while len(self.events) < n:
                await self.changed.wait()
            return list(self.events)
        raise TimeoutError(f"expected {n} events within {timeout}s, got {self.topics()}")


# -- one shim ----------------------------------------------------------------------

@dataclass
class Shim:
    id: str
    bundle: Path
    address: str  # unix:///run/containerd/s/<hex>
    socket_path: str
    pid: int  # the long-lived shim process
    client: Client
    lab: Lab
    start_stdout: bytes = b""
    start_stderr: bytes = b""

    async def call(self, method: str, request: Message, reply_type: type[Message] | None = None,
                   *, timeout: float = 30.0, client: Client | None = None) -> Message | bytes:
        """A task-service call with containerd's namespace header."""
        with trio.fail_after(timeout):
            data = await (client or self.client).call(
                TASK_SERVICE, method, request.SerializeToString(),
                metadata=[(NAMESPACE_HEADER, NAMESPACE)])
        return reply_type.FromString(data) if reply_type is not None else data

    async def create(self, id: str, bundle: Path, rootfs=(), **kw) -> shim_pb2.CreateTaskResponse:
        """Create with the lab's runtime options unless the caller passes ``options``."""
        if "options" not in kw and self.lab.options is not None:
            kw["options"] = self.lab.options
        reply = await self.call("Create", shim_pb2.CreateTaskRequest(
            id=id, bundle=str(bundle), rootfs=list(rootfs), **kw), shim_pb2.CreateTaskResponse)
        self.lab.init_pids.setdefault(id, set()).add(reply.pid)
        return reply

    async def start(self, id: str) -> shim_pb2.StartResponse:
        return await self.call("Start", shim_pb2.StartRequest(id=id), shim_pb2.StartResponse)

    async def wait(self, id: str, *, timeout: float = EVENTUALLY,
                   client: Client | None = None) -> shim_pb2.WaitResponse:
        return await self.call("Wait", shim_pb2.WaitRequest(id=id), shim_pb2.WaitResponse,
                               timeout=timeout, client=client)

    async def kill(self, id: str, sig: int = signal.SIGKILL, all: bool = False) -> None:
        await self.call("Kill", shim_pb2.KillRequest(id=id, signal=sig, all=all))

    async def delete(self, id: str) -> shim_pb2.DeleteResponse:
        return await self.call("Delete", shim_pb2.DeleteRequest(id=id), shim_pb2.DeleteResponse)

    async def state(self, id: str) -> shim_pb2.StateResponse:
        return await self.call("State", shim_pb2.StateRequest(id=id), shim_pb2.StateResponse)

    async def pids(self, id: str) -> shim_pb2.PidsResponse:
        return await self.call("Pids", shim_pb2.PidsRequest(id=id), shim_pb2.PidsResponse)

    async def connect(self, id: str) -> shim_pb2.ConnectResponse:
        return await self.call("Connect", shim_pb2.ConnectRequest(id=id), shim_pb2.ConnectResponse)

    async def shutdown(self, id: str, now: bool = False) -> None:
        await self.call("Shutdown", shim_pb2.ShutdownRequest(id=id, now=now))

    async def open_client(self) -> Client:
        return await self.lab.open_client(self.address)

    def log(self) -> str:
        return self.lab.shim_log(self.bundle)


# -- per-test lab --------------------------------------------------------------------

class Lab:
    """A fresh tmp dir plus bookkeeping of everything started in it."""

    def __init__(self, nursery: trio.Nursery, rootfs_template: Path) -> None:
        self.nursery = nursery
        self.template = rootfs_template
        self.tmp = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
        self.containerd_address = str(self.tmp / "fake-containerd.sock")
        self.events_path = str(self.tmp / "ev.sock")
        self.ids: list[str] = []
        self.shim_pids: set[int] = set()
        self.socket_paths: set[str] = set()
        self.init_pids: dict[str, set[int]] = {}
        self._scopes: list[trio.CancelScope] = []
        self._log_fds: dict[Path, int] = {}
        self._logs: dict[Path, bytearray] = {}
        #: the OCI runtime this lab's containers run on, and the options that select it
        self.runtime = oci_runtime()
        self.options = session_options()

    # ids / bundles
    def new_id(self, tag: str) -> str:
        id = f"pt-{tag}-{os.getpid()}-{next(_ids)}-{secrets.token_hex(3)}"
        self.ids.append(id)
        return id

    def bundle(self, id: str, args: list[str], *, rootfs: str = "busybox", name: str | None = None) -> Path:
        """``<tmp>/<name>/`` with config.json from ``runc spec``; rootfs ``busybox`` or ``empty``."""
        bundle = self.tmp / (name or id[:24])
        bundle.mkdir()
        if rootfs == "busybox":
            clone_rootfs(self.template, bundle / "rootfs")
        else:
            (bundle / "rootfs").mkdir()
        runc_spec(bundle, id, args)
        # containerd creates the shim's log fifo in the bundle and reads it;
        # we hold it open read-write so the shim's log is available on failure.
        fifo = bundle / "log"
        os.mkfifo(fifo)
        self._log_fds[bundle] = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._logs[bundle] = bytearray()
        return bundle

    def busybox_dir(self, name: str = "bbsrc") -> Path:
        d = self.tmp / name
        clone_rootfs(self.template, d)
        return d

    def shim_log(self, bundle: Path) -> str:
        fd = self._log_fds.get(bundle)
        if fd is not None:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                self._logs[bundle] += chunk
        return self._logs.get(bundle, b"").decode(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {b}/log\n{self.shim_log(b)}" for b in list(self._log_fds))

    # background tasks living in the fixture's nursery
    async def start_sink(self, path: str | None = None) -> EventSink:
        sink = EventSink(path or self.events_path)
        await self.nursery.start(sink.run)
        return sink

    async def open_client(self, address: str) -> Client:
        async def hold(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                self._scopes.append(scope)
                async with open_client(address) as client:
                    task_status.started(client)
                    await trio.sleep_forever()
        return await self.nursery.start(hold)

    # the shim binary's actions
    def shim_argv(self, id: str, *rest: str, bundle: Path | None = None) -> list[str]:
        argv = [SHIM_BINARY, "-namespace", NAMESPACE, "-address", self.containerd_address,
                "-publish-binary", PUBLISH_BINARY, "-id", id]
        if bundle is not None:
            argv += ["-bundle", str(bundle)]
        return argv + list(rest)

    async def run_start(self, id: str, bundle: Path, ttrpc_address: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "TTRPC_ADDRESS": self.events_path if ttrpc_address is None else ttrpc_address}
        env.pop("SHIM_CONFIG", None)
        # Each lab plays a containerd of its own (a unique -address), which would
        # otherwise leave a warm template per test behind; the template has its own tests.
        env["SHIM_PY_TEMPLATE"] = "0"
        self.socket_paths.add(socket_path_for(self.containerd_address, NAMESPACE, id))
        # containerd 1.6 writes the runtime options (an Any) on start's stdin
        stdin = self.options.SerializeToString() if self.options is not None else b""
        try:
            with trio.fail_after(EVENTUALLY):
                return await trio.run_process(
                    self.shim_argv(id, "start"), cwd=str(bundle), env=env, stdin=stdin,
                    capture_stdout=True, capture_stderr=True, check=False)
        finally:
            self._track_shims(id)

    def _track_shims(self, id: str) -> list[int]:
        pids = shim_pids(container_id=id, address=self.containerd_address)
        self.shim_pids.update(pids)
        return pids

    async def start_shim(self, id: str, bundle: Path, ttrpc_address: str | None = None) -> Shim:
        """Run the ``start`` action like containerd and connect to the printed address."""
        result = await self.run_start(id, bundle, ttrpc_address)
        out = result.stdout.decode(errors="replace")
        assert result.returncode == 0, f"start failed ({result.returncode}): {out!r} {result.stderr!r}"
        assert ADDRESS_RE.fullmatch(out), f"start printed {out!r} (stderr {result.stderr!r})"
        path = out[len("unix://"):]
        pids = await wait_until(lambda: self._track_shims(id), EVENTUALLY, message=f"shim process for {id}")
        assert len(pids) == 1, f"more than one shim for {id}: {pids}"
        client = await self.open_client(out)
        return Shim(id=id, bundle=bundle, address=out, socket_path=path, pid=pids[0], client=client,
                    lab=self, start_stdout=result.stdout, start_stderr=result.stderr)

    async def run_delete(self, id: str, bundle: Path) -> subprocess.CompletedProcess:
        with trio.fail_after(EVENTUALLY):
            return await trio.run_process(
                self.shim_argv(id, "delete", bundle=bundle), cwd=str(bundle), stdin=b"",
                capture_stdout=True, capture_stderr=True, check=False)

    # teardown
    def cleanup(self) -> list[str]:
        """Remove everything this lab started; return what could not be removed."""
        problems: list[str] = []
        for scope in self._scopes:
            scope.cancel()
        for pid in sorted(self.shim_pids):
            argv = read_cmdline(pid) or []
            if pid_alive(pid) and self.containerd_address in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for id in self.ids:
            subprocess.run([self.runtime, "--root", RUNC_ROOT, "delete", "--force", id],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=EVENTUALLY)
        for id, pids in self.init_pids.items():
            for pid in pids:
                if pid and pid_alive(pid) and in_container_cgroup(pid, id):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for id in self.ids:
            for ctrl in _cgroup_dirs():
                d = ctrl / NAMESPACE / id
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
        for path in self.socket_paths:
            if os.path.exists(path) and not listening_pids(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        for fd in self._log_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log_fds.clear()
        for _ in range(10):
            left = mounts_under(self.tmp)
            if not left:
                break
            for mp in sorted(left, key=len, reverse=True):
                umount_lazy(mp)
        left = mounts_under(self.tmp)
        if left:
            problems.append(f"mounts left under {self.tmp}: {left}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def _cgroup_dirs() -> list[Path]:
    out = []
    with contextlib.suppress(OSError):
        for p in CGROUP_ROOT.iterdir():
            if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists():
                out.append(p)
    if (CGROUP_ROOT / "cgroup.procs").exists():
        out.append(CGROUP_ROOT)
    return out


def namespace_dirs() -> list[Path]:
    """Host dirs runc creates for our namespace (removed at module end if empty and new)."""
    return [Path(RUNC_ROOT)] + [c / NAMESPACE for c in _cgroup_dirs()]


def is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.lstat(path).st_mode)
    except OSError:
        return False


async def expect_error(code, coro, *, contains: str | None = None):
    """Await coro; it must fail with this ttrpc code (and message text). Returns the error."""
    with pytest.raises(TTRPCError) as info:
        await coro
    err = info.value
    assert err.code == code, f"expected {code.name}, got {err}"
    if contains is not None:
        assert contains in err.message, err.message
    return err
