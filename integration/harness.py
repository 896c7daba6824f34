"""Integration-test harness: a private containerd plus a tiny busybox image.

Importable both by pytest (``integration/conftest.py``) and by scripts
(``python -m integration.demo``).  Standard library only.

Everything the harness creates lives under one temp dir (``/tmp/ctrd-XXXX``,
short so that unix socket paths stay < 108 bytes).  A few things containerd
1.6 and its shims put at *fixed* host paths regardless of configuration:

* shim sockets: ``/run/containerd/s/<sha256(address/ns/id)>``
* ctr's default IO fifos: ``/run/containerd/fifo/<random>/<id>-std{in,out,err}``
* the Go shim's runc root: ``/run/containerd/runc/<namespace>/<id>``
* cgroups (v1): ``/sys/fs/cgroup/<controller>/<namespace>/<id>``

``Containerd`` snapshots those locations at ``start()`` and, at ``stop()``,
removes only *empty* directories that did not exist before it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_BIN = PROJECT_ROOT / "bin"
VENV_BIN = PROJECT_ROOT / ".venv" / "bin"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_REF = "docker.io/library/busybox:shimtest"
NAMESPACE = "shimtest"
PY_SHIM_BINARY = "containerd-shim-runc-v2-py"
GO_SHIM_BINARY = "containerd-shim-runc-v2"
PY_RUNTIME = "io.containerd.runc.v2-py"
GO_RUNTIME = "io.containerd.runc.v2"

# Fixed host paths used by containerd 1.6 / ctr / the shims (see module doc).
RUN_CONTAINERD = Path("/run/containerd")
SHIM_SOCKET_DIR = RUN_CONTAINERD / "s"
CTR_FIFO_DIR = RUN_CONTAINERD / "fifo"
RUNC_ROOT = RUN_CONTAINERD / "runc"
CGROUP_V1_ROOT = Path("/sys/fs/cgroup")

#: ``SHIM_RUNC_BINARY=crun``: every ``ctr run`` / ``ctr containers create`` that
#: ``Containerd.ctr``/``ctr_popen`` runs with ``--runtime <ours>`` gets
#: ``--runtime-config-path`` (a TOML ``BinaryName = "crun"``), and ``ctr run
#: --runtime io.containerd.runc.v2`` gets ``--runc-binary crun`` (the Go shim
#: ignores the TOML), so a whole suite can run on another OCI runtime binary.
RUNC_BINARY_ENV = "SHIM_RUNC_BINARY"
#: ``SHIM_PY_GROUP=namespace``: our runtime's ``ctr run``/``create`` get ShimGroup = "namespace"
#: in their runtime options TOML, so one shim serves every task (``make test-namespace``).
SHIM_GROUP_ENV = "SHIM_PY_GROUP"

T = TypeVar("T")


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

#: How long an "eventually" condition (a process exits, a state is reached, a file
#: appears) may take before a test calls it a failure: generous, because a loaded
#: 2-core machine running containerd, shims and runc can be slow, and a bound is
#: only there to end a test that would otherwise hang, never to measure speed.
EVENTUALLY = 30.0


def wait_for(
    predicate: Callable[[], T],
    timeout: float = EVENTUALLY,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Raises ``TimeoutError`` (with ``message``) when ``timeout`` expires.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            msg = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {msg}; last value: {value!r}")
        time.sleep(interval)


def goarch() -> str:
    """Host architecture as GOARCH spells it."""
    m = platform.machine().lower()
    return {
        "x86_64": "amd64", "amd64": "amd64",
        "aarch64": "arm64", "arm64": "arm64",
        "armv7l": "arm", "armv6l": "arm",
        "i386": "386", "i686": "386",
        "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
    }.get(m, m)


def read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if len(args) == 1 and " " in args[0]:
        # A process that set its title (our forked shims) shows one string.
        args = args[0].split()
    return args


def wait_cmdline(pid: int, expected: Iterable[str], timeout: float = EVENTUALLY) -> list[str]:
    """Wait until ``read_cmdline(pid)`` is ``expected``; return it.

    A process that a Start, ``ctr task exec`` or a fork has just created may
    not have finished its execve: until it has, /proc/PID/cmdline is empty or
    still the parent's (``runc init``, ``sh -c ...``). A Start returns when the
    process exists, a ``ps`` lists it as soon as it is in the cgroup: read its
    argv with this, never once. Raises ``TimeoutError`` with the last value read.
    """
    expected = list(expected)
    last: list[list[str] | None] = [None]

    def matches() -> bool:
        last[0] = read_cmdline(pid)
        return last[0] == expected

    wait_for(matches, timeout=timeout, interval=0.02,
             message=lambda: f"/proc/{pid}/cmdline to be {expected} (last read: {last[0]})")
    return expected


def read_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict ({} if the process is gone)."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    st = read_status(pid)
    return bool(st) and not st.get("State", "").startswith("Z")


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def ppid_map() -> dict[int, int]:
    m: dict[int, int] = {}
    for pid in all_pids():
        try:
            stat_ = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'
        rest = stat_.rsplit(")", 1)[1].split()
        m[pid] = int(rest[1])
    return m


def descendants(roots: Iterable[int], pmap: dict[int, int] | None = None) -> set[int]:
    """All descendants (excluding the roots themselves) of the given pids."""
    pmap = ppid_map() if pmap is None else pmap
    children: dict[int, list[int]] = {}
    for pid, ppid in pmap.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    stack = list(roots)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def find_pids(match: Callable[[list[str]], bool]) -> list[int]:
    """Pids (not zombies, not ourselves) whose argv satisfies ``match``."""
    me = os.getpid()
    out = []
    for pid in all_pids():
        if pid == me:
            continue
        argv = read_cmdline(pid)
        if argv and match(argv) and pid_alive(pid):
            out.append(pid)
    return sorted(out)


def shim_pids(container_id: str | None = None, address: str | None = None,
              binary: str | None = None) -> list[int]:
    """Pids of shim processes (Go or Python), optionally filtered.

    A shim daemon's argv is ``<binary> -namespace NS -id ID -address ADDR``
    (the Python shim may run as ``python .../containerd-shim-runc-v2-py ...``).
    When ``address`` is given the binary name is not required (a shim is any
    process with ``-id`` and ``-address ADDR`` flags), so a Python shim that
    re-executes itself under another argv[0] is still found.
    """
    names = (binary,) if binary else (PY_SHIM_BINARY, GO_SHIM_BINARY)

    def match(argv: list[str]) -> bool:
        if (binary is not None or address is None) and not any(os.path.basename(a) in names for a in argv[:3]):
            return False
        if _flag_value(argv, "id") is None:
            return False
        if os.path.basename(argv[0]) in ("ctr", "containerd", "runc", "crun"):
            return False
        if container_id is not None and _flag_value(argv, "id") != container_id:
            return False
        if address is not None and _flag_value(argv, "address") != address:
            return False
        return True

    return find_pids(match)


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a in (f"-{name}", f"--{name}") and i + 1 < len(argv):
            return argv[i + 1]
        for p in (f"-{name}=", f"--{name}="):
            if a.startswith(p):
                return a[len(p):]
    return None


def mounts_under(prefix: str | Path) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at or below ``prefix``."""
    prefix = os.path.realpath(str(prefix)).rstrip("/")
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        mp = _unescape_mountinfo(fields[4])
        if mp == prefix or mp.startswith(prefix + "/"):
            out.append(mp)
    return out


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


_libc = None
MNT_DETACH = 2


def umount_lazy(path: str) -> None:
    """umount2(path, MNT_DETACH); falls back to ``umount -l``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (anymore)
            return
        subprocess.run(["umount", "-l", path], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fifos_under(root: str | Path, ids: Iterable[str] | None = None) -> list[str]:
    """FIFO files below ``root`` (optionally only those whose path mentions one of ``ids``)."""
    ids = list(ids) if ids is not None else None
    out = []
    if not os.path.isdir(root):
        return out
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if not stat.S_ISFIFO(os.lstat(p).st_mode):
                    continue
            except OSError:
                continue
            if ids is None or any(i in p for i in ids):
                out.append(p)
    return sorted(out)


def unix_socket_holders(paths: Iterable[str], listening: bool = False) -> dict[str, set[int]]:
    """For each unix socket path: the pids holding a socket bound to it (empty: orphan file);
    with ``listening``, only a listening socket counts (the one a shim serves on). One pass over
    /proc for any number of paths."""
    paths = list(paths)
    inode_to_path: dict[str, str] = {}
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        lines = []
    wanted = set(paths)
    for line in lines:
        f = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = listening
        if len(f) >= 8 and f[7] in wanted and (not listening or int(f[3], 16) & 0x10000):
            inode_to_path[f"socket:[{f[6]}]"] = f[7]
    out: dict[str, set[int]] = {p: set() for p in paths}
    if not inode_to_path:
        return out
    for pid in all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in inode_to_path:
                out[inode_to_path[link]].add(pid)
    return out


def open_by_any(paths: Iterable[str]) -> set[int]:
    """Pids that have any of ``paths`` (e.g. fifos) open."""
    wanted = set(paths)
    out: set[int] = set()
    for pid in all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    out.add(pid)
                    break
    return out


def orphan_sockets(paths: Iterable[str]) -> list[str]:
    """Socket files (of ``paths``) that still exist but that no process holds.

    Other files there (a template's .pid and .lock) are not sockets and not counted.
    """
    existing = [p for p in paths if _is_socket(p)]
    return sorted(p for p, holders in unix_socket_holders(existing).items() if not holders)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def listdir(path: str | Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def _cgroup_v1_controllers() -> list[Path]:
    out = []
    for p in listdir(CGROUP_V1_ROOT):
        full = CGROUP_V1_ROOT / p
        if full.is_dir() and not full.is_symlink() and (full / "cgroup.procs").exists():
            out.append(full)
    # cgroup v2 unified at /sys/fs/cgroup itself
    if (CGROUP_V1_ROOT / "cgroup.procs").exists():
        out.append(CGROUP_V1_ROOT)
    return sorted(out)


# --------------------------------------------------------------------------
# crun on a hybrid cgroup host: hugetlb on cgroup v1
# --------------------------------------------------------------------------
#
# crun 1.8 refuses a hybrid cgroup host while any controller is left on the
# cgroup v2 (unified) hierarchy ("cgroups in hybrid mode not supported, drop
# all controllers from cgroupv2"); on this VM that is hugetlb, which has no v1
# mount.  ``hugetlb_on_v1()`` mounts it on v1 (only if it is not mounted
# already and crun would refuse) and undoes exactly that afterwards.

CGROUP_UNIFIED = CGROUP_V1_ROOT / "unified"
HUGETLB_V1 = CGROUP_V1_ROOT / "hugetlb"
CRUN_HYBRID_ERROR = "cgroups in hybrid mode not supported"


def hugetlb_mounted() -> bool:
    return os.path.ismount(HUGETLB_V1)


def v2_controllers() -> list[str]:
    """Controllers enabled on the hybrid host's unified hierarchy (what crun objects to)."""
    try:
        return (CGROUP_UNIFIED / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def hybrid_host() -> bool:
    return os.path.ismount(CGROUP_UNIFIED) and not (CGROUP_V1_ROOT / "cgroup.controllers").exists()


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
    subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(HUGETLB_V1)],
                   check=True, capture_output=True, text=True)


def _umount_hugetlb() -> None:
    subprocess.run(["umount", str(HUGETLB_V1)], check=True, capture_output=True, text=True)


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
        busy = _remove_empty_cgroups(HUGETLB_V1)
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
            return [(f"hugetlb v1 hierarchy left behind: busy cgroups {busy}, "
                     f"{hugetlb_cgroup_count()} cgroups in /proc/cgroups")]
        time.sleep(0.1)


class HugetlbMountError(RuntimeError):
    """hugetlb could not be mounted on cgroup v1 (callers typically skip)."""


@contextlib.contextmanager
def hugetlb_on_v1(release_timeout: float = 60.0):
    """hugetlb on cgroup v1 at /sys/fs/cgroup/hugetlb for the ``with`` block, if crun needs it.

    Yields True if it mounted, False if nothing was needed (already a mount,
    or not a hybrid host with hugetlb on v2).  Mounted only then; undone at
    exit by ``release_hugetlb_v1``, and the directory removed if we created
    it.  Raises ``HugetlbMountError`` if the mount fails (nothing left
    behind), ``AssertionError`` at exit if the hierarchy could not be released.
    """
    if hugetlb_mounted() or not crun_refuses_host():
        yield False
        return
    created_dir = not HUGETLB_V1.exists()
    HUGETLB_V1.mkdir(exist_ok=True)
    try:
        _mount_hugetlb()
    except subprocess.CalledProcessError as e:
        if created_dir:
            HUGETLB_V1.rmdir()
        raise HugetlbMountError(f"cannot mount hugetlb on cgroup v1: {e.stderr.strip()}") from None
    try:
        yield True
    finally:
        problems = release_hugetlb_v1(release_timeout)
        if created_dir:
            with contextlib.suppress(OSError):
                HUGETLB_V1.rmdir()
        assert not problems, problems


def oci_runtime_binary() -> str:
    """The OCI runtime that ``ctr run --runtime <ours>`` uses in this session ($SHIM_RUNC_BINARY or runc)."""
    return os.path.basename(os.environ.get(RUNC_BINARY_ENV, "") or "runc")


def runc_binary_toml() -> str:
    """``BinaryName = ...`` line for a test's own runtime options TOML under $SHIM_RUNC_BINARY, else "".

    ``--runtime-config-path`` given by a test wins over $SHIM_RUNC_BINARY
    (``Containerd._with_runc_binary``), so such a TOML has to name the binary itself.
    """
    binary = os.environ.get(RUNC_BINARY_ENV, "")
    return (f"BinaryName = {json.dumps(binary)}\n" if binary else "") + shim_group_toml()


def shim_group() -> str:
    """``$SHIM_PY_GROUP`` (see SHIM_GROUP_ENV): the ShimGroup this session runs our runtime with."""
    return os.environ.get(SHIM_GROUP_ENV, "")


def shim_group_toml() -> str:
    group = shim_group()
    return f"ShimGroup = {json.dumps(group)}\n" if group else ""


def crun_has_criu(crun: str = "crun") -> bool:
    """crun was built with checkpoint/restore (``+CRIU`` in ``crun --version``)."""
    try:
        out = subprocess.run([crun, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "+CRIU" in out.split()


# --------------------------------------------------------------------------
# the busybox image
# --------------------------------------------------------------------------

REQUIRED_APPLETS = (
    "sh", "true", "false", "echo", "cat", "sleep", "dd", "sha256sum", "head",
    "ls", "ps", "kill", "yes", "wc", "env", "id", "printf", "seq", "tee",
    "uname", "mkdir", "rm", "touch", "grep", "tr", "date", "pwd", "hostname",
    "test", "[", "stat", "mount", "top", "tail", "md5sum", "od", "xargs",
)


def _busybox_applets(busybox: str) -> list[str]:
    try:
        out = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    applets = set(out) | set(REQUIRED_APPLETS)
    applets.discard("busybox")
    return sorted(a for a in applets if a and "/" not in a)


def _tar_add(tf: tarfile.TarFile, name: str, *, type_=tarfile.DIRTYPE, mode=0o755,
             data: bytes | None = None, linkname: str = "") -> None:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    if type_ == tarfile.SYMTYPE:
        ti.linkname = linkname
        tf.addfile(ti)
    elif data is not None:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def _blob(files: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    return digest


def build_busybox_image(dest_tar: Path | str, ref: str = DEFAULT_REF,
                        busybox: str = "/usr/bin/busybox", extra_layers: int = 0) -> str:
    """Write an OCI image-layout tarball with a static busybox; return ``ref``.

    ``extra_layers``: that many more layers on top, layer i adding ``/layers/i`` (content
    ``i``) — an image whose overlay lowerdir no longer fits in one page.
    """
    dest_tar = Path(dest_tar)
    bb = Path(busybox).read_bytes()

    # ---- layer
    lbuf = io.BytesIO()
    with tarfile.open(fileobj=lbuf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "dev", "etc", "proc", "sys", "root", "var", "run"):
            _tar_add(tf, d)
        _tar_add(tf, "tmp", mode=0o1777)
        _tar_add(tf, "bin/busybox", type_=tarfile.REGTYPE, mode=0o755, data=bb)
        for applet in _busybox_applets(busybox):
            _tar_add(tf, f"bin/{applet}", type_=tarfile.SYMTYPE, linkname="busybox")
        _tar_add(tf, "etc/passwd", type_=tarfile.REGTYPE, mode=0o644,
                 data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        _tar_add(tf, "etc/group", type_=tarfile.REGTYPE, mode=0o644,
                 data=b"root:x:0:\nnogroup:x:65534:\n")
    layer = lbuf.getvalue()

    files: dict[str, bytes] = {}
    layer_digests = [_blob(files, layer)]  # uncompressed: digest == diff_id
    for i in range(1, extra_layers + 1):
        ebuf = io.BytesIO()
        with tarfile.open(fileobj=ebuf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            _tar_add(tf, "layers")
            _tar_add(tf, f"layers/{i}", type_=tarfile.REGTYPE, mode=0o644, data=f"{i}\n".encode())
        layer_digests.append(_blob(files, ebuf.getvalue()))

    config = {
        "architecture": goarch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "integration/harness.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = _blob(files, config_bytes)

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": d, "size": len(files["blobs/sha256/" + d.split(":", 1)[1]])} for d in layer_digests],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = _blob(files, manifest_bytes)

    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "platform": {"architecture": goarch(), "os": "linux"},
            "annotations": {
                "io.containerd.image.name": ref,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }
    files["index.json"] = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'

    dest_tar.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_tar.with_name(dest_tar.name + ".part")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("blobs", "blobs/sha256"):
            _tar_add(tf, d)
        for name in sorted(files):
            _tar_add(tf, name, type_=tarfile.REGTYPE, mode=0o644, data=files[name])
    tmp.replace(dest_tar)
    return ref


# --------------------------------------------------------------------------
# leak detection
# --------------------------------------------------------------------------

@dataclass
class Leftovers:
    processes: dict[int, str] = field(default_factory=dict)  # pid -> cmdline
    containers: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    fifos: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    runc_state: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.processes, self.containers, self.mounts, self.fifos,
                    self.sockets, self.runc_state, self.cgroups))

    def __str__(self) -> str:
        parts = []
        for name in ("processes", "containers", "mounts", "fifos", "sockets", "runc_state", "cgroups"):
            v = getattr(self, name)
            if v:
                parts.append(f"{name}: {v}")
        return "; ".join(parts) or "nothing left over"


# --------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------

class ContainerdError(RuntimeError):
    pass


class Containerd:
    """A private containerd (never the default socket) in ``/tmp/ctrd-XXXX``."""

    def __init__(self, log_level: str = "debug", namespace: str = NAMESPACE,
                 extra_config: str = "", tmp_parent: str = "/tmp",
                 extra_env: dict[str, str] | None = None,
                 shim_nofile: tuple[int, int] | None = None) -> None:
        self.log_level = log_level
        # (soft, hard) RLIMIT_NOFILE our shim's launcher starts with: containerd 2.x under
        # systemd passes 1024 soft down; 1.6 passes its own raised limit (see shim_wrapper_dir).
        self.shim_nofile = shim_nofile
        self.extra_env = dict(extra_env or {})  # containerd's env, so also the shims' env
        self._namespace = namespace
        self.extra_config = extra_config
        self.tmp_parent = tmp_parent
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        # snapshot of fixed host paths, taken at start()
        self._preexisting_dirs: set[str] = set()
        self._sockets_before: set[str] = set()
        self._fifo_dirs_before: set[str] = set()
        self._exec_ids: set[str] = set()  # every ``task exec --exec-id`` run through ctr()
        self.stop_report: Leftovers | None = None
        self.image_ref: str | None = None  # set by whoever imports an image

    # -- properties -------------------------------------------------------
    def _need_dir(self) -> Path:
        if self.dir is None:
            raise ContainerdError("containerd not started")
        return self.dir

    @property
    def address(self) -> str:
        return str(self._need_dir() / "c.sock")

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"  # what containerd 1.6 derives when unset

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def root(self) -> Path:
        return self._need_dir() / "root"

    @property
    def state(self) -> Path:
        return self._need_dir() / "state"

    @property
    def log_path(self) -> Path:
        return self._need_dir() / "containerd.log"

    @property
    def config_path(self) -> Path:
        return self._need_dir() / "config.toml"

    @property
    def bundle_dir(self) -> Path:
        """Where the v2 runtime puts bundles: <state>/io.containerd.runtime.v2.task/<ns>."""
        return self.state / "io.containerd.runtime.v2.task" / self.namespace

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "PYTHONPATH")}
        first = [str(self.shim_wrapper_dir)] if self.shim_nofile else []
        env["PATH"] = os.pathsep.join([*first, str(PROJECT_BIN), str(VENV_BIN), SYSTEM_PATH])
        env.update(self.extra_env)
        return env

    @property
    def shim_wrapper_dir(self) -> Path:
        return self._need_dir() / "shim-bin"

    def _write_shim_wrapper(self) -> None:
        """With ``shim_nofile``: a launcher of the same name first on containerd's PATH that
        sets that open-file limit and execs the real one (test-only: what containerd 2.x
        started by systemd does to its shims)."""
        assert self.shim_nofile is not None
        soft, hard = self.shim_nofile
        self.shim_wrapper_dir.mkdir()
        wrapper = self.shim_wrapper_dir / PY_SHIM_BINARY
        wrapper.write_text(f"#!/bin/sh\nulimit -S -n {soft} && ulimit -H -n {hard} || exit 1\n"
                           f"exec {PROJECT_BIN / PY_SHIM_BINARY} \"$@\"\n")
        wrapper.chmod(0o755)

    # -- lifecycle ----------------------------------------------------------
    def config_toml(self) -> str:
        d = self._need_dir()
        return f"""\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.ttrpc_address}"

[debug]
  address = ""
  level = "{self.log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{self.extra_config}
"""

    def start(self, timeout: float = 30.0) -> Self:
        if self.proc is not None:
            raise ContainerdError("already started")
        if shutil.which("containerd") is None:
            raise ContainerdError("containerd is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="ctrd-", dir=self.tmp_parent))
        if len(self.address.encode()) + 8 >= 100:
            raise ContainerdError(f"socket path too long: {self.address}")
        self._snapshot_host_paths()
        self.config_path.write_text(self.config_toml())
        if self.shim_nofile:
            self._write_shim_wrapper()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - held for containerd's lifetime
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=self.env, cwd=str(self.dir), start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ContainerdError(
                        f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
                if os.path.exists(self.address):
                    r = self.ctr("version", check=False, timeout=10)
                    if r.returncode == 0:
                        break
                if time.monotonic() > deadline:
                    raise ContainerdError(f"containerd not ready after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 30.0,
                while_down: Callable[[], None] | None = None) -> None:
        """Stop containerd with ``sig`` and start it again on the same config, state and socket;
        shims and containers are left running, as on a node whose containerd restarts.
        ``while_down`` runs after containerd has exited and before it starts again (an outage)."""
        assert self.proc is not None and self._log_file is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        if while_down is not None:
            while_down()
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=self.env, cwd=str(self.dir), start_new_session=True,
        )
        wait_for(lambda: os.path.exists(self.address) and self.ctr("version", check=False, timeout=10).returncode == 0,
                 timeout=timeout, message=lambda: f"containerd to come back:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, ContainerdError):
            return "<no log>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def template_pid(self, python: str = "") -> int | None:
        """The warm shim template serving this containerd (one per -address and interpreter:
        ``python``, when not this checkout's, for a shim installed elsewhere), if any."""
        from shim.launch import template_client as shim_template

        path = shim_template.socket_path(self.address, python=python)
        try:
            pid = int(Path(path + ".pid").read_text())
        except (OSError, ValueError):
            return None
        argv = read_cmdline(pid) or []
        return pid if path in argv else None

    def stop_template(self, timeout: float = EVENTUALLY, python: str = "") -> int | None:
        """End the template this containerd's shims started (it would idle out later), and
        remove the first start's mark; ``python``: of a shim installed elsewhere."""
        from shim.launch import template_client as shim_template

        pid = self.template_pid(python)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not pid_alive(pid), timeout=timeout, message=f"template {pid} to exit")
        path = shim_template.socket_path(self.address, python=python)
        # the first start's mark that a template is wanted, and what a template killed by a
        # test (SIGKILL: no cleanup of its own) left: its files, its socket if nobody listens
        leftovers = [path + suffix for suffix in (".wanted", ".pid", ".lock", ".log")]
        if os.path.exists(path) and not unix_socket_holders([path], listening=True)[path]:
            leftovers.append(path)
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        return pid

    def stop(self, timeout: float = 15.0, remove_containers: bool = True) -> Leftovers:
        """Stop containerd and clean up everything this instance created.

        Returns (and stores in ``stop_report``) what had to be cleaned up
        forcibly: containers still present, leftover processes, mounts,
        fifos, sockets ...  An empty report is falsy.
        """
        report = Leftovers()
        if self.dir is None:
            return report
        ids: set[str] = set()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = set(self.tasks()) | self.containers()
            report.containers = sorted(ids)
            if remove_containers:
                for cid in sorted(ids):
                    with contextlib.suppress(Exception):
                        self.remove_container(cid)
        # Processes that belong to this instance (shims, runc, containers),
        # collected *before* containerd goes away.
        related = self.related_pids()
        new_sockets = self.new_shim_sockets()
        our_sockets = {p for p, holders in unix_socket_holders(new_sockets).items()
                       if holders & related}
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self.proc is not None:
            related.discard(self.proc.pid)
        template_pid = self.stop_template()
        if template_pid is not None:
            related.discard(template_pid)
        # containerd may have died: also take ids from our bundle dir.  Only
        # these ids are touched in the shared host paths (/run/containerd,
        # cgroups), so a concurrent harness instance is left alone.
        ids |= listdir(self.bundle_dir)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

        # leftovers: shims survive containerd by design; kill what is ours.
        related |= self.related_pids()
        related = {p for p in related if pid_alive(p)}
        for pid in related:
            report.processes[pid] = " ".join(read_cmdline(pid) or [])
        for pid in related:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(pid_alive(p) for p in related), timeout=5,
                     message="leftover processes to die")

        report.fifos = fifos_under(self.dir)
        # ctr's fifo dirs (/run/containerd/fifo/<rand>/<id>-std*) of our containers
        # ... and of our execs: ctr leaves those behind when it is killed (a test's
        # background exec) or when its exec fails (ctr 1.6 does not close the IO
        # it created); names are exec ids, so also require that nobody has them open.
        for name in listdir(CTR_FIFO_DIR) - self._fifo_dirs_before:
            fdir = CTR_FIFO_DIR / name
            entries = listdir(fdir)
            if not entries:
                continue
            owners = {e.rsplit("-", 1)[0] for e in entries}
            paths = [str(fdir / e) for e in sorted(entries)]
            if owners <= ids or (owners <= ids | self._exec_ids and not open_by_any(paths)):
                report.fifos += paths
                shutil.rmtree(fdir, ignore_errors=True)
        # shim sockets: ours are those bound by our shims, or named after our ids
        names = {self.shim_socket_name(i) for i in ids}
        report.sockets = sorted(s for s in self.new_shim_sockets()
                                if s in our_sockets or os.path.basename(s) in names)
        for s in report.sockets:
            with contextlib.suppress(OSError):
                os.unlink(s)

        # mounts under our dir, deepest first
        mps = mounts_under(self.dir)
        report.mounts = list(mps)
        for mp in sorted(set(mps), key=lambda p: p.count("/"), reverse=True):
            umount_lazy(mp)
        still = mounts_under(self.dir)
        if still:
            # one more pass (stacked mounts on the same mount point)
            for mp in sorted(still, key=lambda p: p.count("/"), reverse=True):
                umount_lazy(mp)

        # runc state + cgroups of our containers
        report.runc_state = sorted(str(RUNC_ROOT / self.namespace / i) for i in ids
                                   if (RUNC_ROOT / self.namespace / i).exists())
        for path in report.runc_state:
            shutil.rmtree(path, ignore_errors=True)
        report.cgroups = self._cleanup_cgroups(ids)
        self._remove_created_dirs()

        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            # e.g. a mount that could not be detached: report, don't fail
            report.mounts.append(f"(could not remove {self.dir})")
        self.dir = None
        self.proc = None
        self.stop_report = report
        return report

    # -- host path bookkeeping -------------------------------------------
    def _watched_dirs(self) -> list[Path]:
        dirs = [RUN_CONTAINERD, SHIM_SOCKET_DIR, CTR_FIFO_DIR, RUNC_ROOT,
                RUNC_ROOT / self.namespace]
        dirs += [c / self.namespace for c in _cgroup_v1_controllers()]
        return dirs

    def _snapshot_host_paths(self) -> None:
        self._preexisting_dirs = {str(d) for d in self._watched_dirs() if d.exists()}
        self._sockets_before = listdir(SHIM_SOCKET_DIR)
        self._fifo_dirs_before = listdir(CTR_FIFO_DIR)

    def new_shim_sockets(self) -> list[str]:
        """Sockets in /run/containerd/s that appeared since start()."""
        return sorted(str(SHIM_SOCKET_DIR / n)
                      for n in listdir(SHIM_SOCKET_DIR) - self._sockets_before)

    def _cleanup_cgroups(self, ids: Iterable[str]) -> list[str]:
        """rmdir (leaf first) <ctrl>/<namespace>/<id> cgroups of our containers;
        then <ctrl>/<namespace> itself if it did not exist before start() and is empty."""
        left = []
        for c in _cgroup_v1_controllers():
            nsdir = c / self.namespace
            if not nsdir.is_dir():
                continue
            for cid in ids:
                cdir = nsdir / cid
                if not cdir.is_dir():
                    continue
                subs = sorted((Path(dp) for dp, _d, _f in os.walk(cdir)),
                              key=lambda p: len(p.parts), reverse=True)
                left.append(str(cdir))
                for sub in subs:
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            if str(nsdir) not in self._preexisting_dirs:
                with contextlib.suppress(OSError):
                    nsdir.rmdir()
        return left

    def _remove_created_dirs(self) -> None:
        # deepest first; only empty dirs that did not exist before start()
        for d in sorted(self._watched_dirs(), key=lambda p: len(p.parts), reverse=True):
            if str(d) in self._preexisting_dirs:
                continue
            if d.is_relative_to(CGROUP_V1_ROOT):
                continue  # handled by _cleanup_cgroups
            with contextlib.suppress(OSError):
                d.rmdir()

    # -- processes ------------------------------------------------------------
    def serving_shims(self, cid: str) -> set[int]:
        """Pids listening on the socket the task's bundle names (whichever task started that shim)."""
        from integration.shim_driver import listening_pids

        try:
            address = (self.bundle_dir / cid / "address").read_text()
        except OSError:
            return set()
        return listening_pids(address.removeprefix("unix://"))

    def shim_pids(self, container_id: str | None = None) -> list[int]:
        """Shim daemons (any flavour) serving this containerd.

        A shim is a process with ``-id ID`` and ``-address <our socket>``; as a
        fallback, a process named like a shim binary with ``-id ID`` and
        ``-namespace <our ns>`` but no ``-address`` flag at all.
        """
        if self.dir is None:
            return []
        pids = set(shim_pids(container_id=container_id, address=self.address))

        def fallback(argv: list[str]) -> bool:
            return (any(os.path.basename(a) in (PY_SHIM_BINARY, GO_SHIM_BINARY) for a in argv[:3])
                    and _flag_value(argv, "address") is None
                    and _flag_value(argv, "namespace") == self.namespace
                    and _flag_value(argv, "id") is not None
                    and (container_id is None or _flag_value(argv, "id") == container_id))
        pids |= set(find_pids(fallback))
        return sorted(pids)

    def related_pids(self) -> set[int]:
        """Shims/runc/containers that came from this containerd (not containerd itself).

        Shims re-parent to init, so ancestry alone is not enough: take every
        process whose argv mentions our temp dir (shims: ``-address``; runc:
        ``--log <state>/...``; the bundle path), plus all their descendants,
        plus descendants of containerd.
        """
        if self.dir is None:
            return set()
        d = str(self.dir)
        me = os.getpid()
        roots = set(find_pids(lambda argv: any(a == d or d + "/" in a for a in argv)))
        if self.proc is not None and self.proc.poll() is None:
            roots.add(self.proc.pid)
        pids = roots | descendants(roots)
        pids.discard(me)
        if self.proc is not None:
            pids.discard(self.proc.pid)
        # never touch our own ancestors
        pids -= _ancestors(me)
        return pids

    # -- ctr ------------------------------------------------------------------
    def ctr_argv(self, *args: str) -> list[str]:
        if args[:2] in (("task", "exec"), ("t", "exec"), ("tasks", "exec")):
            exec_id = _flag_value(list(args), "exec-id")
            if exec_id:
                self._exec_ids.add(exec_id)
        return ["ctr", "--address", self.address, "-n", self.namespace,
                *self._with_runc_binary(list(args))]

    def runtime_config(self, binary: str) -> Path:
        """A runtime options TOML (``BinaryName = BINARY``) for ``--runtime-config-path``."""
        group = shim_group()
        path = self._need_dir() / f"runtime-{os.path.basename(binary)}{'-' + group if group else ''}.toml"
        text = f"BinaryName = {json.dumps(binary)}\n{shim_group_toml()}"
        # ctr runs of concurrent threads share this file, and a launcher reads it on start:
        # rewriting it in place let a start read it empty (no ShimGroup: a per-task shim).
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(text)
            tmp.replace(path)
        return path

    def runc_binary_args(self, runtime: str, binary: str) -> list[str]:
        """ctr flags that make ``ctr run --runtime RUNTIME`` use OCI runtime ``binary``."""
        if runtime == GO_RUNTIME:
            return ["--runc-binary", binary]
        return ["--runtime-config-path", str(self.runtime_config(binary))]

    def _with_runc_binary(self, args: list[str]) -> list[str]:
        """Apply ``$SHIM_RUNC_BINARY`` and ``$SHIM_PY_GROUP`` to a ``run``/``containers create``."""
        binary = os.environ.get(RUNC_BINARY_ENV, "")
        if not binary and not shim_group():
            return args
        if args[:1] == ["run"]:
            head = 1
        elif len(args) >= 2 and args[0] in ("containers", "container", "c") and args[1] == "create":
            head = 2
        else:
            return args
        runtime = None
        for i, a in enumerate(args):
            if a.startswith(("--runtime-config-path", "--runc-binary")):
                return args  # the caller chose already
            if a == "--runtime" and i + 1 < len(args):
                runtime = args[i + 1]
            elif a.startswith("--runtime="):
                runtime = a.split("=", 1)[1]
            if runtime is not None:
                break
        if runtime == PY_RUNTIME or (runtime == GO_RUNTIME and head == 1 and binary):
            return args[:head] + self.runc_binary_args(runtime, binary or "runc") + args[head:]
        return args

    def ctr(self, *args: str, check: bool = True, input: str | bytes | None = None,
            timeout: float | None = 60, text: bool = True) -> subprocess.CompletedProcess:
        """Run ``ctr --address SOCK -n NS ARGS...``; capture stdout/stderr."""
        argv = self.ctr_argv(*args)
        if input is not None and text and isinstance(input, bytes):
            input = input.decode()
        r = subprocess.run(argv, input=input, capture_output=True, text=text,
                           timeout=timeout, env=self.env,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def ctr_popen(self, *args: str, **kw) -> subprocess.Popen:
        """Start ``ctr ...`` in the background (stdout/stderr piped unless given)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("env", self.env)
        return subprocess.Popen(self.ctr_argv(*args), **kw)

    def import_image(self, tar: Path | str) -> str:
        r = self.ctr("images", "import", "--no-unpack", str(tar), timeout=120)
        # unpack explicitly for the default snapshotter so the first run is fast
        return r.stdout

    def tasks(self) -> dict[str, dict[str, str]]:
        """``ctr task ls`` parsed: {id: {"pid": ..., "status": ...}}."""
        r = self.ctr("task", "ls")
        out = {}
        for line in r.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = {"pid": parts[1], "status": parts[2]}
        return out

    def containers(self) -> set[str]:
        r = self.ctr("containers", "ls", "-q")
        return set(r.stdout.split())

    def remove_container(self, cid: str) -> None:
        """Best-effort: kill + delete task, delete container."""
        if cid in self.tasks():
            self.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
            self.ctr("task", "rm", "-f", cid, check=False)
        if cid in self.containers():
            self.ctr("containers", "rm", cid, check=False)

    # -- leak checks ------------------------------------------------------------
    def leftovers(self, ids: Iterable[str]) -> Leftovers:
        """What is still around for the given container ids (after they were deleted)."""
        ids = list(ids)
        lo = Leftovers()
        idset = set(ids)
        for pid in self.shim_pids():
            if _flag_value(read_cmdline(pid) or [], "id") in idset:
                lo.processes[pid] = " ".join(read_cmdline(pid) or [])
        # runc invocations / container processes mentioning the ids
        for pid in find_pids(lambda argv: os.path.basename(argv[0]) in ("runc", "crun")
                             and any(i in a for a in argv for i in ids)):
            lo.processes[pid] = " ".join(read_cmdline(pid) or [])
        # container processes: anything still in a <ns>/<id> cgroup
        suffixes = tuple(f"/{self.namespace}/{i}" for i in ids)
        for pid in all_pids():
            try:
                cg = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            except OSError:
                continue
            if any(line.endswith(suffixes) for line in cg) and pid_alive(pid):
                lo.processes[pid] = " ".join(read_cmdline(pid) or [])
        for cid in ids:
            bundle = self.bundle_dir / cid
            lo.mounts += mounts_under(bundle)
            if (RUNC_ROOT / self.namespace / cid).exists():
                lo.runc_state.append(str(RUNC_ROOT / self.namespace / cid))
            if bundle.exists():
                lo.runc_state.append(str(bundle))
            for c in _cgroup_v1_controllers():
                if (c / self.namespace / cid).exists():
                    lo.cgroups.append(str(c / self.namespace / cid))
        lo.fifos = fifos_under(CTR_FIFO_DIR, ids) + fifos_under(self._need_dir(), ids)
        lo.sockets = [s for s in self.new_shim_sockets()
                      if os.path.basename(s) in {self.shim_socket_name(i) for i in ids}]
        return lo

    def shim_socket_name(self, cid: str) -> str:
        """Basename of the shim socket containerd 1.6 derives for ``cid``."""
        return hashlib.sha256(os.path.join(self.address, self.namespace, cid).encode()).hexdigest()


def _ancestors(pid: int) -> set[int]:
    out = set()
    pmap = ppid_map()
    while pid in pmap and pid not in out and pid > 1:
        out.add(pid)
        pid = pmap[pid]
    return out


def leftovers(since: set[int], match: Callable[[list[str]], bool] | None = None) -> dict[int, str]:
    """Processes that did not exist in ``since`` and look shim/runc/container related.

    ``since`` is a snapshot of ``set(all_pids())``; ``match`` narrows further.
    """
    names = {PY_SHIM_BINARY, GO_SHIM_BINARY, "runc", "crun"}
    out = {}
    for pid in all_pids():
        if pid in since or pid == os.getpid():
            continue
        argv = read_cmdline(pid)
        if not argv or not pid_alive(pid):
            continue
        if match is not None:
            if match(argv):
                out[pid] = " ".join(argv)
        elif any(os.path.basename(a) in names for a in argv[:3]):
            out[pid] = " ".join(argv)
    return out
