"""The Kubernetes path: a private containerd with its CRI plugin, driven like kubelet does.

``CriContainerd`` is ``integration.harness.Containerd`` with the CRI plugin enabled on the
private socket, two runtime handlers (``runc-py``: this shim; ``runc``: containerd's Go shim, the
reference) and a private CNI network (a bridge and a /24 of its own). ``CriClient`` speaks the
CRI ``runtime.v1`` gRPC API to it with modules generated at session start from
``integration/cri/proto/api.proto`` (``load_cri_api``).

Everything the session creates on the host is named after one random token and removed by
``CriContainerd.stop``: the bridge ``shimtest-<hex>``, host-side veths on it, CNI result cache
files of its network, pod netns (CRI puts them under the private state dir,
``netns_mounts_under_state_dir``), pod cgroups (below ``/<ctrl>/shimtest-cri-<hex>``), and
``net.ipv4.ip_forward`` is put back (the bridge plugin turns it on for a gateway bridge).
Pods get no default route (host-local ``routes`` left empty), so whatever a pod sends can only
reach the host and the other pods on that bridge; the tests send a few packets from the host to
a pod, and only after checking that the host routes the pod's address through the bridge.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import ipaddress
import json
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from integration.harness import (
    CGROUP_V1_ROOT,
    GO_RUNTIME,
    PY_RUNTIME,
    RUNC_BINARY_ENV,
    SHIM_SOCKET_DIR,
    Containerd,
    _cgroup_v1_controllers,
    _remove_empty_cgroups,
    all_pids,
    build_busybox_image,
    mounts_under,
    orphan_sockets,
    pid_alive,
    read_cmdline,
    umount_lazy,
    wait_for,
)

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto" / "api.proto"

CRI_NAMESPACE = "k8s.io"
PY_HANDLER = "runc-py"   # runtime_type io.containerd.runc.v2-py: this shim
PY_SHARED_HANDLER = "runc-py-shared"  # the same with ShimGroup = "namespace": one shim for k8s.io
GO_HANDLER = "runc"      # runtime_type io.containerd.runc.v2: containerd's Go shim
BUSYBOX_REF = "docker.io/library/busybox:shimtest"
PAUSE_REF = "docker.io/shimtest/pause:1"
#: The sandbox ("pause") container: sleeps until SIGTERM (or SIGINT), then exits 0.
PAUSE_SCRIPT = 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'

CNI_BIN_DIR = Path("/usr/lib/cni")                 # Debian's containernetworking-plugins
CNI_PLUGINS = ("bridge", "host-local", "loopback")
CNI_CACHE_RESULTS = Path("/var/lib/cni/results")   # libcni's cache (not configurable in CRI 1.6)
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
NETNS_DIR = Path("/var/run/netns")                 # CRI's default; ours go under the state dir

GRPC_TIMEOUT = 60.0  # every CRI call is bounded


def skip_reason() -> str | None:
    """Why the CRI suite cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "CRI tests need root (private containerd, runc, CNI bridge)"
    for module in ("grpc", "grpc_tools"):
        if importlib.util.find_spec(module) is None:
            return f"python module {module} missing (pip install -e '.[dev]', or make setup)"
    for tool in ("containerd", "ctr", "runc", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    missing = [p for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()]
    if missing:
        return (f"CNI plugins {missing} missing in {CNI_BIN_DIR} "
                "(apt-get install containernetworking-plugins, or make setup)")
    if not Path("/usr/bin/busybox").exists():
        return "/usr/bin/busybox missing (apt-get install busybox-static)"
    binary = os.path.basename(os.environ.get(RUNC_BINARY_ENV, ""))
    if binary and shutil.which(binary) is None:
        return f"{RUNC_BINARY_ENV}={binary} but it is not installed"
    return None


# --------------------------------------------------------------------------
# CRI API modules, generated at session start
# --------------------------------------------------------------------------

_API_PACKAGE = "shimtest_cri_v1"
_api_lock = threading.Lock()
_api: types.SimpleNamespace | None = None


def load_cri_api(out_dir: str | Path) -> types.SimpleNamespace:
    """Generate Python + gRPC modules from ``proto/api.proto`` into ``out_dir`` and import them.

    Returns ``SimpleNamespace(pb=<api_pb2>, grpc=<api_pb2_grpc>)``. Once per process: protobuf's
    descriptor pool holds ``runtime.v1`` after the first import, so later calls return it.
    """
    global _api
    with _api_lock:
        if _api is not None:
            return _api
        import grpc_tools
        from grpc_tools import protoc

        out_dir = Path(out_dir)
        pkg = out_dir / _API_PACKAGE
        pkg.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROTO, pkg / "api.proto")
        include = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{out_dir}", f"-I{include}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            str(pkg / "api.proto"),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
        sys.path.insert(0, str(out_dir))
        try:
            pb = importlib.import_module(f"{_API_PACKAGE}.api_pb2")
            grpc_mod = importlib.import_module(f"{_API_PACKAGE}.api_pb2_grpc")
        finally:
            sys.path.remove(str(out_dir))
        _api = types.SimpleNamespace(pb=pb, grpc=grpc_mod)
        return _api


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------

def build_image_variant(dest_tar: Path | str, ref: str, *, entrypoint: list[str] | None = None,
                        cmd: list[str] | None = None, stop_signal: str | None = None) -> str:
    """The busybox image of ``build_busybox_image`` under another ref, with another config."""
    dest_tar = Path(dest_tar)
    base = dest_tar.with_name(dest_tar.name + ".base")
    build_busybox_image(base, ref=ref)
    try:
        with tarfile.open(base) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    finally:
        base.unlink()

    def blob(digest: str) -> bytes:
        return files.pop("blobs/sha256/" + digest.split(":", 1)[1])

    def put(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
        return digest

    index = json.loads(files["index.json"])
    mdesc = index["manifests"][0]
    manifest = json.loads(blob(mdesc["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    cfg = config["config"]
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    if cmd is not None:
        cfg["Cmd"] = cmd
    elif entrypoint is not None:
        cfg.pop("Cmd", None)
    if stop_signal is not None:
        cfg["StopSignal"] = stop_signal
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest["config"].update(digest=put(config_bytes), size=len(config_bytes))
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    mdesc.update(digest=put(manifest_bytes), size=len(manifest_bytes))
    files["index.json"] = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()

    tmp = dest_tar.with_name(dest_tar.name + ".part")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.mode, ti.size = 0o644, len(files[name])
            tf.addfile(ti, io.BytesIO(files[name]))
    tmp.replace(dest_tar)
    return ref


# --------------------------------------------------------------------------
# host network helpers (ip(8))
# --------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def links_on_bridge(bridge: str) -> list[str]:
    """Interfaces enslaved to ``bridge`` (the host ends of pod veths)."""
    if not link_exists(bridge):
        return []
    r = _ip("-o", "link", "show", "master", bridge, check=False)
    out = []
    for line in r.stdout.splitlines():
        # "12: veth1234@if3: <...> ..."
        parts = line.split(":", 2)
        if len(parts) >= 2:
            out.append(parts[1].strip().split("@", 1)[0])
    return out


def _used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for args in (("-o", "-4", "addr", "show"), ("-o", "-4", "route", "show", "table", "all")):
        for line in _ip(*args, check=False).stdout.splitlines():
            for word in line.split():
                with contextlib.suppress(ValueError):
                    if "/" in word or word[0].isdigit():
                        nets.append(ipaddress.ip_network(word, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def choose_subnet(prefix: str = "10.250", tries: int = 64) -> ipaddress.IPv4Network:
    """A free ``<prefix>.N.0/24``: no address or route of this host overlaps it."""
    used = _used_ipv4_networks()
    for _ in range(tries):
        net = ipaddress.ip_network(f"{prefix}.{random.randrange(1, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError(f"no free /24 in {prefix}.0.0/16")


def route_dev(ip: str) -> str | None:
    """The interface the host routes ``ip`` through."""
    words = _ip("-o", "route", "get", ip, check=False).stdout.split()
    return words[words.index("dev") + 1] if "dev" in words else None


def icmp_echo(ip: str, count: int = 5, timeout: float = 1.0, payload: int = 56) -> int:
    """Send ``count`` ICMP echo requests to ``ip`` from the host (like ``ping -c N -W 1``).

    Returns how many replies came back. Bounded: ``count`` packets, ``timeout`` s per reply.
    """
    ident = (os.getpid() ^ random.randrange(1 << 16)) & 0xFFFF
    got = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(count):
            body = bytes(random.randrange(256) for _ in range(payload))
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            csum = _inet_checksum(header + body)
            s.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, seq) + body, (ip, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, (src, _) = s.recvfrom(4096)
                except TimeoutError:
                    break
                ihl = (data[0] & 0x0F) * 4
                typ, _code, _c, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if src == ip and typ == 0 and rid == ident and rseq == seq:
                    got += 1
                    break
    return got


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


# --------------------------------------------------------------------------
# containerd with CRI
# --------------------------------------------------------------------------

@dataclass
class CriLeftovers:
    processes: dict[int, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    veths: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    bundles: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in self.__dataclass_fields__)

    def __str__(self) -> str:
        return "; ".join(f"{f}: {getattr(self, f)}" for f in self.__dataclass_fields__
                         if getattr(self, f)) or "nothing left over"


class CriContainerd(Containerd):
    """``Containerd`` in namespace ``k8s.io`` with the CRI plugin on the private socket."""

    CRI_PLUGIN = "io.containerd.grpc.v1.cri"

    def __init__(self, log_level: str = "info") -> None:
        super().__init__(log_level=log_level, namespace=CRI_NAMESPACE)
        self.token = secrets.token_hex(3)
        self.bridge = f"shimtest-{self.token}"         # 15 chars: IFNAMSIZ-1
        self.network_name = f"shimtest-{self.token}"
        self.subnet = choose_subnet()
        self.cgroup_root = f"shimtest-cri-{self.token}"  # pods' cgroup parents go below it
        self.runc_binary = os.environ.get(RUNC_BINARY_ENV, "") or "runc"
        self.netns_seen: set[str] = set()  # pod netns paths the tests saw (PodSandboxStatus)
        self.sandboxes_seen: set[str] = set()  # every sandbox id RunPodSandbox returned
        self._ip_forward_before: str | None = None
        self._cni_cache_existed = CNI_CACHE_RESULTS.exists()
        self._var_lib_cni_existed = CNI_CACHE_RESULTS.parent.exists()
        self.network_report: list[str] = []

    # -- paths ----------------------------------------------------------------
    @property
    def cni_conf_dir(self) -> Path:
        return self._need_dir() / "cni" / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self._need_dir() / "cni" / "ipam"

    @property
    def runc_py_toml(self) -> Path:
        return self._need_dir() / "runc-py.toml"

    @property
    def runc_py_shared_toml(self) -> Path:
        return self._need_dir() / "runc-py-namespace.toml"

    @property
    def log_root(self) -> Path:
        """Where the tests put pods' LogDirectory (kubelet: /var/log/pods)."""
        return self._need_dir() / "pods"

    @property
    def cri_state(self) -> Path:
        return self.state / self.CRI_PLUGIN

    @property
    def cri_root(self) -> Path:
        return self.root / self.CRI_PLUGIN

    @property
    def netns_dir(self) -> Path:
        return self.cri_state / "netns"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    # -- config -------------------------------------------------------------
    def cri_config(self) -> str:
        cri = f'plugins."{self.CRI_PLUGIN}"'
        go_options = ""
        if self.runc_binary != "runc":
            go_options = (f"    [{cri}.containerd.runtimes.{GO_HANDLER}.options]\n"
                          f"      BinaryName = {json.dumps(self.runc_binary)}\n")
        return f"""
[{cri}]
  sandbox_image = "{PAUSE_REF}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{GO_HANDLER}"
    [{cri}.containerd.runtimes.{GO_HANDLER}]
      runtime_type = "{GO_RUNTIME}"
{go_options}    [{cri}.containerd.runtimes.{PY_HANDLER}]
      runtime_type = "{PY_RUNTIME}"
      [{cri}.containerd.runtimes.{PY_HANDLER}.options]
        ConfigPath = "{self.runc_py_toml}"
    [{cri}.containerd.runtimes.{PY_SHARED_HANDLER}]
      runtime_type = "{PY_RUNTIME}"
      [{cri}.containerd.runtimes.{PY_SHARED_HANDLER}.options]
        ConfigPath = "{self.runc_py_shared_toml}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
"""

    def cni_conflist(self) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": self.network_name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                    # no "routes": pods get no default route, only the bridge's /24
                    "dataDir": str(self.ipam_dir),
                },
            }],
        }

    def config_toml(self) -> str:
        base = super().config_toml()
        line = f'  "{self.CRI_PLUGIN}",\n'
        if line not in base:
            raise RuntimeError("integration.harness.Containerd config no longer disables CRI as expected")
        # files the config names; the private dir exists by now
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        self.ipam_dir.mkdir(parents=True, exist_ok=True)
        self.log_root.mkdir(parents=True, exist_ok=True)
        (self.cni_conf_dir / "10-shimtest.conflist").write_text(json.dumps(self.cni_conflist(), indent=2))
        self.runc_py_toml.write_text(f"BinaryName = {json.dumps(self.runc_binary)}\n")
        self.runc_py_shared_toml.write_text(f'BinaryName = {json.dumps(self.runc_binary)}\nShimGroup = "namespace"\n')
        return base.replace(line, "") + self.cri_config()

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Self:
        self._ip_forward_before = IP_FORWARD.read_text().strip()
        super().start(timeout)
        return self

    def import_images(self) -> None:
        """busybox and the pause image, unpacked, in namespace k8s.io (as CRI needs them)."""
        d = self._need_dir()
        build_busybox_image(d / "busybox.tar", ref=BUSYBOX_REF)
        build_image_variant(d / "pause.tar", PAUSE_REF, entrypoint=["/bin/sh", "-c", PAUSE_SCRIPT],
                            stop_signal="SIGTERM")
        for tar in ("busybox.tar", "pause.tar"):
            self.ctr("images", "import", str(d / tar), timeout=120)

    def stop(self, timeout: float = 15.0, remove_containers: bool = True):  # type: ignore[override]
        """Stop containerd (the base class cleans its processes/mounts/dirs), then the network,
        the pods' cgroups and ip_forward. ``network_report`` lists what had to be removed."""
        if self.dir is None:
            return super().stop(timeout, remove_containers)
        netns_dir = self.netns_dir
        sockets = [str(SHIM_SOCKET_DIR / self.shim_socket_name(i)) for i in self.sandboxes_seen]
        report = super().stop(timeout, remove_containers)
        self.network_report = self._cleanup_host(netns_dir, sockets)
        return report

    def _cleanup_host(self, netns_dir: Path, shim_sockets: list[str]) -> list[str]:
        notes = []
        # sockets of pod shims that died without removing them (the base class only knows
        # the ids still in containerd's bundle dir)
        for path in orphan_sockets(shim_sockets):
            notes.append(f"shim socket {path}")
            with contextlib.suppress(OSError):
                os.unlink(path)
        # host ends of pod veths still on our bridge (a pod whose CNI DEL never ran)
        for veth in links_on_bridge(self.bridge):
            notes.append(f"veth {veth}")
            _ip("link", "del", veth, check=False)
        if link_exists(self.bridge):
            _ip("link", "del", self.bridge, check=False)
        # pod netns outside the private dir (only the ones our pods used)
        for p in sorted(self.netns_seen):
            if not p.startswith(str(netns_dir)) and os.path.exists(p):
                notes.append(f"netns {p}")
                umount_lazy(p)
                with contextlib.suppress(OSError):
                    os.unlink(p)
        # libcni's result cache: our network's, and CRI's loopback network's for our sandboxes
        cached = set(CNI_CACHE_RESULTS.glob(f"{self.network_name}-*"))
        for sid in self.sandboxes_seen:
            cached |= set(CNI_CACHE_RESULTS.glob(f"cni-loopback-{sid}-*"))
        for f in sorted(cached):
            notes.append(f"cni cache {f}")
            with contextlib.suppress(OSError):
                f.unlink()
        if not self._cni_cache_existed:
            with contextlib.suppress(OSError):
                CNI_CACHE_RESULTS.rmdir()
        if not self._var_lib_cni_existed:
            with contextlib.suppress(OSError):
                CNI_CACHE_RESULTS.parent.rmdir()
        # pods' cgroups
        for ctrl in _cgroup_v1_controllers():
            root = ctrl / self.cgroup_root
            if root.is_dir():
                busy = _remove_empty_cgroups(root)
                with contextlib.suppress(OSError):
                    root.rmdir()
                if root.exists():
                    notes.append(f"cgroup {root} (busy: {busy})")
        # the bridge plugin enables forwarding for a gateway bridge; put it back
        if self._ip_forward_before is not None and IP_FORWARD.read_text().strip() != self._ip_forward_before:
            IP_FORWARD.write_text(self._ip_forward_before + "\n")
        return notes

    # -- what pods leave behind ------------------------------------------------
    def cgroup_parent(self, pod_uid: str) -> str:
        return f"/{self.cgroup_root}/pod{pod_uid}"

    def processes_in_cgroups(self, needle: str | None = None) -> dict[int, str]:
        """Live processes whose cgroup path contains ``/<cgroup_root>/`` (and ``needle``)."""
        marker = f"/{self.cgroup_root}/"
        out = {}
        for pid in all_pids():
            try:
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            except OSError:
                continue
            if any(marker in ln and (needle is None or needle in ln) for ln in lines) and pid_alive(pid):
                out[pid] = " ".join(read_cmdline(pid) or [])
        return out

    def pod_leftovers(self, sandbox_ids: Iterable[str], container_ids: Iterable[str] = (),
                      netns: Iterable[str] = (), veths: Iterable[str] = ()) -> CriLeftovers:
        """What is still on the host for these (stopped and removed) pods and containers."""
        sandbox_ids, container_ids = list(sandbox_ids), list(container_ids)
        ids = sandbox_ids + container_ids
        lo = CriLeftovers()
        for i in ids:
            for pid in self.shim_pids(i):
                lo.processes[pid] = " ".join(read_cmdline(pid) or [])
            for pid, argv in self.processes_in_cgroups(i).items():
                lo.processes[pid] = argv
            for base in (self.bundle_dir, self.cri_state / "sandboxes", self.cri_state / "containers",
                         self.cri_root / "sandboxes", self.cri_root / "containers"):
                lo.mounts += mounts_under(base / i)
            if (self.bundle_dir / i).exists():
                lo.bundles.append(str(self.bundle_dir / i))
            sock = SHIM_SOCKET_DIR / self.shim_socket_name(i)
            if sock.exists():
                lo.sockets.append(str(sock))
            for ctrl in _cgroup_v1_controllers():
                for d in ctrl.glob(f"{self.cgroup_root}/*/{i}"):
                    lo.cgroups.append(str(d))
        for p in netns:
            if os.path.exists(p):
                lo.netns.append(p)
            lo.mounts += mounts_under(p)
        lo.veths = [v for v in veths if link_exists(v)]
        return lo


# --------------------------------------------------------------------------
# CRI client
# --------------------------------------------------------------------------

class CriClient:
    """kubelet's side: the RuntimeService and ImageService stubs on containerd's socket."""

    def __init__(self, api: types.SimpleNamespace, address: str) -> None:
        import grpc

        self.api = api
        self.pb = api.pb
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = api.grpc.RuntimeServiceStub(self.channel)
        self.images = api.grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def rt(self, method: str, deadline: float = GRPC_TIMEOUT, **fields):
        """RuntimeService.<method>(<method>Request(**fields)), bounded by ``deadline`` seconds."""
        request = getattr(self.pb, f"{method}Request")(**fields)
        return getattr(self.runtime, method)(request, timeout=deadline)

    def img(self, method: str, deadline: float = GRPC_TIMEOUT, **fields):
        request = getattr(self.pb, f"{method}Request")(**fields)
        return getattr(self.images, method)(request, timeout=deadline)

    # -- convenience -----------------------------------------------------------
    def sandbox_status(self, sandbox_id: str, verbose: bool = False):
        return self.rt("PodSandboxStatus", pod_sandbox_id=sandbox_id, verbose=verbose)

    def sandbox_info(self, sandbox_id: str) -> dict:
        return json.loads(self.sandbox_status(sandbox_id, verbose=True).info.get("info", "{}"))

    def container_status(self, container_id: str, verbose: bool = False):
        return self.rt("ContainerStatus", container_id=container_id, verbose=verbose)

    def container_info(self, container_id: str) -> dict:
        return json.loads(self.container_status(container_id, verbose=True).info.get("info", "{}"))

    def wait_container_state(self, container_id: str, state: int, timeout: float = 30.0):
        def check():
            st = self.container_status(container_id).status
            return st if st.state == state else None
        return wait_for(check, timeout=timeout, interval=0.1,
                        message=f"container {container_id[:12]} in state "
                                f"{self.pb.ContainerState.Name(state)}")

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 10):
        """ExecSync with CRI's own timeout (seconds); the gRPC call gets 30 s more."""
        request = self.pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        return self.runtime.ExecSync(request, timeout=timeout + 30)


def netns_path_of(info: dict) -> str | None:
    """The network namespace path in a sandbox's verbose info (its runtime spec)."""
    for ns in (info.get("runtimeSpec", {}).get("linux", {}) or {}).get("namespaces", []) or []:
        if ns.get("type") == "network":
            return ns.get("path") or None
    return None


# --------------------------------------------------------------------------
# kubelet's part
# --------------------------------------------------------------------------

@dataclass
class Pod:
    id: str
    name: str
    uid: str
    handler: str
    config: object            # the PodSandboxConfig it was run with
    log_dir: Path
    netns: str | None = None
    veth: str | None = None   # host end of the pod's eth0 (from CNI's result)
    ip: str = ""
    containers: list[str] = field(default_factory=list)
    removed: bool = False


def ppid_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Kubelet:
    """Runs pods and containers through CRI the way kubelet does; removes what is left at ``cleanup``."""

    def __init__(self, cri: CriContainerd, client: CriClient) -> None:
        self.cri = cri
        self.client = client
        self.pb = client.pb
        self.pods: list[Pod] = []
        self._lock = threading.Lock()

    # -- pods -----------------------------------------------------------------
    def pod_config(self, name: str, uid: str, *, host_network: bool = False):
        pb = self.pb
        ns = pb.NamespaceOption(network=pb.NODE if host_network else pb.POD,
                                pid=pb.CONTAINER, ipc=pb.POD)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="shimtest", attempt=0),
            # runc refuses a hostname without a private UTS namespace (a host-network pod's)
            hostname="" if host_network else name,
            log_directory=str(self.cri.log_root / uid),
            labels={"shimtest.session": self.cri.token, "app": name},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=self.cri.cgroup_parent(uid),
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns),
            ),
        )

    def run_pod(self, name: str, handler: str = PY_HANDLER, *, host_network: bool = False) -> Pod:
        import uuid

        uid = str(uuid.uuid4())
        config = self.pod_config(name, uid, host_network=host_network)
        (self.cri.log_root / uid).mkdir(parents=True, exist_ok=True)  # kubelet creates it
        sid = self.client.rt("RunPodSandbox", config=config, runtime_handler=handler).pod_sandbox_id
        pod = Pod(id=sid, name=name, uid=uid, handler=handler, config=config,
                  log_dir=self.cri.log_root / uid)
        with self._lock:
            self.pods.append(pod)
            self.cri.sandboxes_seen.add(sid)
        st = self.client.sandbox_status(sid, verbose=True)
        pod.ip = st.status.network.ip
        info = json.loads(st.info.get("info", "{}"))
        pod.netns = netns_path_of(info)
        for ifname, iface in ((info.get("cniResult") or {}).get("Interfaces") or {}).items():
            if not iface.get("Sandbox") and ifname != self.cri.bridge:
                pod.veth = ifname
        if pod.netns:
            with self._lock:
                self.cri.netns_seen.add(pod.netns)
        return pod

    def stop_pod(self, pod: Pod) -> None:
        self.client.rt("StopPodSandbox", pod_sandbox_id=pod.id)

    def remove_pod(self, pod: Pod) -> None:
        """StopPodSandbox + RemovePodSandbox (once)."""
        if pod.removed:
            return
        self.client.rt("StopPodSandbox", pod_sandbox_id=pod.id)
        self.client.rt("RemovePodSandbox", pod_sandbox_id=pod.id)
        pod.removed = True

    # -- containers -------------------------------------------------------------
    def container_config(self, pod: Pod, name: str, script: str | None = None, *,
                         command: list[str] | None = None, attempt: int = 0, memory: int = 0,
                         cpu_quota: int = 0, cpu_period: int = 0, cpu_shares: int = 2,
                         image: str = BUSYBOX_REF):
        """A ContainerConfig as kubelet builds it: the pod's namespace modes, resources, log path
        ``<name>_<attempt>.log`` relative to the pod's LogDirectory, ``sh -c script``."""
        pb = self.pb
        ns = pb.NamespaceOption()
        ns.CopyFrom(pod.config.linux.security_context.namespace_options)
        if command is None:
            command = ["sh", "-c", script if script is not None else "sleep 3600"]
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image),
            command=command,
            log_path=f"{name}_{attempt}.log",
            labels={"shimtest.session": self.cri.token},
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(
                    memory_limit_in_bytes=memory, cpu_quota=cpu_quota, cpu_period=cpu_period,
                    cpu_shares=cpu_shares),
                security_context=pb.LinuxContainerSecurityContext(namespace_options=ns)),
        )

    def create_container(self, pod: Pod, name: str, script: str | None = None, **kw) -> str:
        config = self.container_config(pod, name, script, **kw)
        cid = self.client.rt("CreateContainer", pod_sandbox_id=pod.id, config=config,
                             sandbox_config=pod.config).container_id
        pod.containers.append(cid)
        return cid

    def start_container(self, pod: Pod, name: str, script: str | None = None, **kw) -> str:
        cid = self.create_container(pod, name, script, **kw)
        self.client.rt("StartContainer", container_id=cid)
        return cid

    def log_path(self, pod: Pod, name: str, attempt: int = 0) -> Path:
        return pod.log_dir / f"{name}_{attempt}.log"

    # -- processes --------------------------------------------------------------
    def shim_of(self, pod: Pod) -> int:
        """The one shim serving ``pod`` (asserts there is exactly one)."""
        pids = self.cri.shim_pids(pod.id)
        assert len(pids) == 1, f"pod {pod.name}: shims {pids}"
        return pids[0]

    def task_pid(self, container_or_sandbox_id: str, sandbox: bool = False) -> int:
        info = (self.client.sandbox_info if sandbox else self.client.container_info)(container_or_sandbox_id)
        return int(info["pid"])

    # -- teardown -----------------------------------------------------------------
    def leftovers(self, pods: Iterable[Pod]) -> CriLeftovers:
        pods = list(pods)
        return self.cri.pod_leftovers([p.id for p in pods], [c for p in pods for c in p.containers],
                                      [p.netns for p in pods if p.netns],
                                      [p.veth for p in pods if p.veth])

    def cleanup(self) -> list[str]:
        """Stop and remove every pod this kubelet ran that is still there; return their names
        (with the error, for a pod CRI failed to remove)."""
        left = []
        for pod in self.pods:
            if pod.removed:
                continue
            try:
                self.remove_pod(pod)
                left.append(pod.name)
            except Exception as e:  # noqa: BLE001 - reported, the session's teardown retries
                left.append(f"{pod.name} ({pod.id[:12]}): removal failed: {e!r}")
        return left


def shim_stats(cri: CriContainerd, sandbox_id: str, task_id: str | None = None):
    """Task/Stats straight from the pod's shim over ttrpc (address from the sandbox bundle);
    returns the decoded ``io.containerd.cgroups.v1.Metrics`` (or v2)."""
    import trio

    from shim.proto import cgroups_v1_metrics_pb2, cgroups_v2_metrics_pb2, shim_pb2
    from shim.ttrpc import open_client

    address = (cri.bundle_dir / sandbox_id / "address").read_text().strip()
    request = shim_pb2.StatsRequest(id=task_id or sandbox_id).SerializeToString()

    async def call() -> bytes:
        with trio.fail_after(15):
            async with open_client(address) as client:
                return await client.call("containerd.task.v2.Task", "Stats", request,
                                         metadata=[("containerd-namespace-ttrpc", CRI_NAMESPACE)],
                                         timeout=10)

    resp = shim_pb2.StatsResponse.FromString(trio.run(call))
    type_name = resp.stats.type_url.rsplit("/", 1)[-1]
    cls = {"io.containerd.cgroups.v1.Metrics": cgroups_v1_metrics_pb2.Metrics,
           "io.containerd.cgroups.v2.Metrics": cgroups_v2_metrics_pb2.Metrics}[type_name]
    return cls.FromString(resp.stats.value)


def cgroup_dir(cri: CriContainerd, pod: Pod, container_id: str, controller: str) -> Path:
    """A container's cgroup (v1 controller) as CRI names it: <cgroup_parent>/<container id>."""
    return CGROUP_V1_ROOT / controller / cri.cgroup_parent(pod.uid).lstrip("/") / container_id


#: "<RFC3339Nano> <stream> <P|F> <content>", what CRI writes for kubelet (one line each)
CRI_LOG_LINE = r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)) (?P<stream>stdout|stderr) (?P<tag>[PF]) (?P<content>.*)$"


def parse_cri_log(text: str) -> list[tuple[str, str, str, str]]:
    """(time, stream, tag, content) per line; raises ValueError on a line not in CRI's format."""
    import re

    out = []
    for line in text.splitlines():
        m = re.match(CRI_LOG_LINE, line)
        if m is None:
            raise ValueError(f"not a CRI log line: {line!r}")
        out.append((m["time"], m["stream"], m["tag"], m["content"]))
    return out
