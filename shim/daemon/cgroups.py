"""cgroup statistics for Task.Stats, and the cgroup lookup the OOM watcher needs.

Reads cgroupfs directly, the way containerd/cgroups (v1.0.4, which containerd 1.6's
runc shim uses) does, and fills the wire-compatible ``io.containerd.cgroups.v1/v2``
``Metrics`` messages. Mode detection follows ``cgroups.Mode()``: the root is cgroup2
-> ``"v2"`` (unified); ``<root>/unified`` is cgroup2 -> ``"hybrid"``; otherwise
``"v1"`` (legacy). Like containerd, hybrid hosts report v1 metrics.

Every filesystem location is a parameter (cgroup root, /proc, mountinfo), so tests
point the code at fake trees. Missing controllers and files are skipped (the field
stays zero/unset); they are not errors.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from google.protobuf import any_pb2

from shim.common.config import CGROUP_ROOT
from shim.proto import cgroups_v1_metrics_pb2 as v1pb
from shim.proto import cgroups_v2_metrics_pb2 as v2pb

PROC = "/proc"
MOUNTINFO = "/proc/self/mountinfo"

V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"

MAX_UINT64 = (1 << 64) - 1
MAX_UINT32 = (1 << 32) - 1

Mode = Literal["v1", "v2", "hybrid"]

# Errors that mean "this file/cgroup is not there (any more)": skipped, not raised.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ESRCH)


# --- mode detection -------------------------------------------------------------


#: Compiled at import, so in the warm template: a pattern compiled on first use is compiled
#: (and cached) again in every forked shim, in pages of its own.
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_BLKIO_SEPARATOR = re.compile(r"[ :]")


def _unescape_mount_path(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), s)


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, fs type) for each line of a mountinfo file, in mount order."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            pre, sep, post = line.partition(" - ")
            fields = pre.split()
            if not sep or len(fields) < 5 or not post.split():
                continue
            out.append((_unescape_mount_path(fields[4]), post.split()[0]))
    return out


def _fs_type(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """The fs type of the mount that holds ``path`` (longest mount point; last mount wins)."""
    path = os.path.normpath(path)
    best: tuple[int, str] | None = None
    for mountpoint, fstype in mounts:
        mp = os.path.normpath(mountpoint)
        under = path == mp or path.startswith(mp.rstrip("/") + "/")
        if under and (best is None or len(mp) >= best[0]):
            best = (len(mp), fstype)
    return best[1] if best else None


def cgroup_mode(root: str = CGROUP_ROOT, *, mountinfo: str = MOUNTINFO) -> Mode:
    """``"v2"`` if ``root`` is cgroup2, ``"hybrid"`` if ``root/unified`` is, else ``"v1"``.

    The fs types come from ``mountinfo``; if it cannot be read, fall back to looking
    for the cgroup2-only ``cgroup.controllers`` file.
    """
    try:
        mounts = _mounts(mountinfo)
    except OSError:
        if os.path.isfile(os.path.join(root, "cgroup.controllers")):
            return "v2"
        if os.path.isfile(os.path.join(root, "unified", "cgroup.controllers")):
            return "hybrid"
        return "v1"
    if _fs_type(root, mounts) == "cgroup2":
        return "v2"
    if _fs_type(os.path.join(root, "unified"), mounts) == "cgroup2":
        return "hybrid"
    return "v1"


_host: list[Mode] = []


def _host_mode() -> Mode:
    """This host's mode, read once: it is fixed while the system runs (Go's cgroups.Mode()
    is computed once too), and reading mountinfo again cost each Create ~0.2 ms (twice: its
    Stats cgroup and its OOM watch), more on a node with many mounts."""
    if not _host:
        _host.append(cgroup_mode())
    return _host[0]


# --- /proc/PID/cgroup -------------------------------------------------------------


def parse_cgroup_file(text: str) -> dict[str, str]:
    """Parse /proc/PID/cgroup: ``{controller: path}``; the v2 ``0::/path`` line is key ``""``.

    ``4:cpu,cpuacct:/x`` gives both ``cpu`` and ``cpuacct``; named hierarchies keep their
    name (``name=systemd``). Malformed lines are skipped.
    """
    out: dict[str, str] = {}
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        # A container's dict is kept for its life: one string per distinct path (v1 gives the
        # same path for every controller) and interned controller names, ~1 KiB less each.
        path = paths.setdefault(parts[2], parts[2])
        for ctrl in parts[1].split(","):
            out[sys.intern(ctrl)] = path
    return out


def cgroup_paths(pid: int, proc: str = PROC) -> dict[str, str]:
    """``{controller: path}`` for ``pid`` (see :func:`parse_cgroup_file`).

    Raises FileNotFoundError/ProcessLookupError if the process is gone.
    """
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            text = f.read()
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from e
        raise
    return parse_cgroup_file(text)


def v1_controller_dir(root: str, controller: str, path: str) -> str:
    """``<root>/<controller>/<path>``; ``name=systemd`` lives at ``<root>/systemd``."""
    return os.path.join(root, controller.removeprefix("name="), path.lstrip("/"))


# --- small readers ------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise


def _uint(s: str) -> int:
    """containerd's parseUint: negative numbers (e.g. -1 limits) read as 0."""
    v = int(s)
    if v < 0:
        return 0
    return min(v, MAX_UINT64)


def _read_uint(path: str, *, max_value: int | None = None) -> int | None:
    """A single-number file; ``max`` maps to ``max_value`` (None: unreadable)."""
    text = _read(path)
    if text is None:
        return None
    s = text.strip()
    if s == "max":
        return max_value
    try:
        return _uint(s)
    except ValueError:
        return None


def parse_kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, memory.oom_control, memory.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0]] = _uint(parts[1])
        except ValueError:
            continue
    return out


def _read_kv(path: str) -> dict[str, int] | None:
    text = _read(path)
    return None if text is None else parse_kv(text)


_Rdma = TypeVar("_Rdma", v1pb.RdmaEntry, v2pb.RdmaEntry)


def _rdma_entries(text: str | None, entry_type: type[_Rdma]) -> list[_Rdma]:
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        entry = entry_type(device=parts[0])
        for kv in parts[1:]:
            k, sep, v = kv.partition("=")
            if not sep:
                continue
            try:
                n = MAX_UINT32 if v == "max" else min(_uint(v), MAX_UINT32)
            except ValueError:
                continue
            if k == "hca_handle":
                entry.hca_handles = n
            elif k == "hca_object":
                entry.hca_objects = n
        out.append(entry)
    return out


# --- cgroup v1 ----------------------------------------------------------------------

_NS_PER_SEC = 1_000_000_000
try:
    _CLOCK_TICKS = os.sysconf("SC_CLK_TCK") or 100
except (ValueError, OSError):
    _CLOCK_TICKS = 100  # containerd hard-codes 100

# memory.stat key -> MemoryStat field (the only names that differ are pgpg*/memsw).
_V1_MEMORY_STAT = {
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
    "hierarchical_memory_limit": "hierarchical_memory_limit",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}
_V1_MEMORY_STAT.update(
    {
        "total_" + k: "total_" + v
        for k, v in _V1_MEMORY_STAT.items()
        if not k.startswith("hierarchical_")
    }
)

# memory.<module>.<file> -> MemoryEntry field
_V1_MEMORY_ENTRIES = (("", "usage"), ("memsw.", "swap"), ("kmem.", "kernel"), ("kmem.tcp.", "kernel_tcp"))
_V1_MEMORY_ENTRY_FILES = (
    ("usage_in_bytes", "usage"),
    ("max_usage_in_bytes", "max"),
    ("failcnt", "failcnt"),
    ("limit_in_bytes", "limit"),
)

# CFQ/BFQ-era recursive files (blkio.<name>) -> BlkIOStat field, in containerd's order.
_V1_BLKIO_RECURSIVE = (
    ("sectors_recursive", "sectors_recursive"),
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("time_recursive", "io_time_recursive"),
)
_V1_BLKIO_THROTTLE = (
    ("throttle.io_serviced", "io_serviced_recursive"),
    ("throttle.io_service_bytes", "io_service_bytes_recursive"),
)


def parse_oom_control(text: str) -> v1pb.MemoryOomControl:
    """memory.oom_control (``oom_kill_disable``/``under_oom``/``oom_kill`` lines)."""
    kv = parse_kv(text)
    return v1pb.MemoryOomControl(
        oom_kill_disable=kv.get("oom_kill_disable", 0),
        under_oom=kv.get("under_oom", 0),
        oom_kill=kv.get("oom_kill", 0),
    )


def _block_devices(partitions: str) -> dict[tuple[int, int], str]:
    """(major, minor) -> /dev/<name> from /proc/partitions (first two lines are a header)."""
    out: dict[tuple[int, int], str] = {}
    text = _read(partitions) or ""
    for line in text.splitlines()[2:]:
        f = line.split()
        if len(f) < 4:
            continue
        try:
            key = (int(f[0]), int(f[1]))
        except ValueError:
            continue
        out.setdefault(key, "/dev/" + f[3])
    return out


def _blkio_entries(text: str, devices: dict[tuple[int, int], str]) -> list[v1pb.BlkIOEntry]:
    out = []
    for line in text.splitlines():
        fields = [f for f in _BLKIO_SEPARATOR.split(line) if f]
        if len(fields) < 3:
            continue  # "Total N" and blank lines
        try:
            major, minor = int(fields[0]), int(fields[1])
            if len(fields) == 4:
                op, value = fields[2], int(fields[3])
            else:
                op, value = "", int(fields[2])
        except ValueError:
            continue
        out.append(
            v1pb.BlkIOEntry(
                op=op, device=devices.get((major, minor), ""), major=major, minor=minor, value=value
            )
        )
    return out


class CgroupV1:
    """A process's v1 cgroups: ``paths`` maps controller -> path (as in /proc/PID/cgroup)."""

    def __init__(self, paths: dict[str, str], root: str = CGROUP_ROOT, *, proc: str = PROC):
        self.paths = {k: v for k, v in paths.items() if k}
        self.root = root
        self.proc = proc

    def path(self, controller: str) -> str | None:
        """The controller's directory for this cgroup, or None if it is not there."""
        rel = self.paths.get(controller)
        if rel is None:
            return None
        d = v1_controller_dir(self.root, controller, rel)
        return d if os.path.isdir(d) else None

    def metrics(self) -> v1pb.Metrics:
        m = v1pb.Metrics()
        m.cpu.usage.SetInParent()  # containerd always sends cpu{usage,throttling}
        m.cpu.throttling.SetInParent()
        if d := self.path("cpuacct"):
            self._cpuacct(d, m)
        if d := self.path("cpu"):
            self._cpu(d, m)
        if d := self.path("memory"):
            self._memory(d, m)
        if d := self.path("pids"):
            self._pids(d, m)
        if d := self.path("blkio"):
            self._blkio(d, m)
        if d := self.path("hugetlb"):
            self._hugetlb(d, m)
        if d := self.path("rdma"):
            m.rdma.current.extend(_rdma_entries(_read(os.path.join(d, "rdma.current")), v1pb.RdmaEntry))
            m.rdma.limit.extend(_rdma_entries(_read(os.path.join(d, "rdma.max")), v1pb.RdmaEntry))
        return m

    @staticmethod
    def _cpuacct(d: str, m: v1pb.Metrics) -> None:
        usage = m.cpu.usage
        if (total := _read_uint(os.path.join(d, "cpuacct.usage"))) is not None:
            usage.total = total
        if (text := _read(os.path.join(d, "cpuacct.usage_percpu"))) is not None:
            try:
                usage.per_cpu.extend(_uint(v) for v in text.split())
            except ValueError:
                pass
        if (kv := _read_kv(os.path.join(d, "cpuacct.stat"))) is not None:
            # USER_HZ ticks -> nanoseconds
            usage.user = kv.get("user", 0) * _NS_PER_SEC // _CLOCK_TICKS
            usage.kernel = kv.get("system", 0) * _NS_PER_SEC // _CLOCK_TICKS

    @staticmethod
    def _cpu(d: str, m: v1pb.Metrics) -> None:
        if (kv := _read_kv(os.path.join(d, "cpu.stat"))) is None:
            return
        t = m.cpu.throttling
        t.periods = kv.get("nr_periods", 0)
        t.throttled_periods = kv.get("nr_throttled", 0)
        t.throttled_time = kv.get("throttled_time", 0)

    @staticmethod
    def _memory(d: str, m: v1pb.Metrics) -> None:
        mem = m.memory
        for _, entry in _V1_MEMORY_ENTRIES:
            getattr(mem, entry).SetInParent()
        if (kv := _read_kv(os.path.join(d, "memory.stat"))) is not None:
            for key, fname in _V1_MEMORY_STAT.items():
                setattr(mem, fname, kv.get(key, 0))
        if (text := _read(os.path.join(d, "memory.oom_control"))) is not None:
            m.memory_oom_control.CopyFrom(parse_oom_control(text))
        for module, entry_name in _V1_MEMORY_ENTRIES:
            entry = getattr(mem, entry_name)
            for fname, attr in _V1_MEMORY_ENTRY_FILES:
                v = _read_uint(os.path.join(d, f"memory.{module}{fname}"))
                if v is not None:
                    setattr(entry, attr, v)

    @staticmethod
    def _pids(d: str, m: v1pb.Metrics) -> None:
        current = _read_uint(os.path.join(d, "pids.current"))
        limit = _read_uint(os.path.join(d, "pids.max"), max_value=0)  # "max" -> 0
        if current is None and limit is None:
            return
        m.pids.current = current or 0
        m.pids.limit = limit or 0

    def _blkio(self, d: str, m: v1pb.Metrics) -> None:
        b = m.blkio
        b.SetInParent()
        devices = _block_devices(os.path.join(self.proc, "partitions"))
        size = 0
        if os.path.lexists(os.path.join(d, "blkio.io_serviced_recursive")):
            for name, attr in _V1_BLKIO_RECURSIVE:
                if (text := _read(os.path.join(d, "blkio." + name))) is not None:
                    entries = _blkio_entries(text, devices)
                    getattr(b, attr).extend(entries)
                    size += len(entries)
        if size:
            return
        # No CFQ stats (or none for this cgroup's devices): fall back to throttle.*.
        for name, attr in _V1_BLKIO_THROTTLE:
            if (text := _read(os.path.join(d, "blkio." + name))) is not None:
                getattr(b, attr).extend(_blkio_entries(text, devices))

    @staticmethod
    def _hugetlb(d: str, m: v1pb.Metrics) -> None:
        try:
            names = os.listdir(d)
        except OSError:
            return
        sizes = sorted(
            parts[1]
            for parts in (n.split(".") for n in names)
            if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] == "usage_in_bytes"
        )
        for size in sizes:
            s = v1pb.HugetlbStat(pagesize=size)
            for fname, attr in (("usage_in_bytes", "usage"), ("max_usage_in_bytes", "max"), ("failcnt", "failcnt")):
                v = _read_uint(os.path.join(d, f"hugetlb.{size}.{fname}"))
                if v is not None:
                    setattr(s, attr, v)
            m.hugetlb.append(s)


# --- cgroup v2 ----------------------------------------------------------------------

_V2_MEMORY_STAT = (
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file",
    "active_file", "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault",
    "pgmajfault", "workingset_refault", "workingset_activate", "workingset_nodereclaim",
    "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
    "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc",
)  # fmt: skip
_V2_CPU_STAT = ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec")


def parse_memory_events(text: str) -> v2pb.MemoryEvents:
    """memory.events (``low``/``high``/``max``/``oom``/``oom_kill`` lines)."""
    kv = parse_kv(text)
    return v2pb.MemoryEvents(**{k: kv.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")})


def _io_entries(text: str | None) -> list[v2pb.IOEntry]:
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        majmin = parts[0].split(":")
        if len(majmin) != 2:
            continue
        try:
            entry = v2pb.IOEntry(major=int(majmin[0]), minor=int(majmin[1]))
        except ValueError:
            continue
        for kv in parts[1:]:
            k, sep, v = kv.partition("=")
            if sep and k in ("rbytes", "wbytes", "rios", "wios") and v.isdigit():
                setattr(entry, k, int(v))
        out.append(entry)
    return out


class CgroupV2:
    """A unified-hierarchy cgroup: ``path`` as in the ``0::/path`` line, under ``root``."""

    def __init__(self, path: str, root: str = CGROUP_ROOT):
        self.rel = path
        self.root = root
        self.path = os.path.join(root, path.lstrip("/"))

    def _f(self, name: str) -> str:
        return os.path.join(self.path, name)

    def metrics(self) -> v2pb.Metrics:
        m = v2pb.Metrics()
        m.pids.current = _read_uint(self._f("pids.current")) or 0
        m.pids.limit = _read_uint(self._f("pids.max"), max_value=MAX_UINT64) or 0

        cpu = _read_kv(self._f("cpu.stat")) or {}
        m.cpu.SetInParent()
        for k in _V2_CPU_STAT:
            setattr(m.cpu, k, cpu.get(k, 0))

        mem = _read_kv(self._f("memory.stat")) or {}
        m.memory.SetInParent()
        for k in _V2_MEMORY_STAT:
            setattr(m.memory, k, mem.get(k, 0))
        for fname, attr in (
            ("memory.current", "usage"),
            ("memory.max", "usage_limit"),
            ("memory.swap.current", "swap_usage"),
            ("memory.swap.max", "swap_limit"),
        ):
            setattr(m.memory, attr, _read_uint(self._f(fname), max_value=MAX_UINT64) or 0)

        if (text := _read(self._f("memory.events"))) is not None and parse_kv(text):
            m.memory_events.CopyFrom(parse_memory_events(text))

        m.io.SetInParent()
        m.io.usage.extend(_io_entries(_read(self._f("io.stat"))))
        m.rdma.SetInParent()
        m.rdma.current.extend(_rdma_entries(_read(self._f("rdma.current")), v2pb.RdmaEntry))
        m.rdma.limit.extend(_rdma_entries(_read(self._f("rdma.max")), v2pb.RdmaEntry))
        m.hugetlb.extend(self._hugetlb())
        return m

    def _hugetlb(self) -> list[v2pb.HugeTlbStat]:
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        stats: dict[str, v2pb.HugeTlbStat] = {}
        for name in sorted(names):
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "hugetlb" or parts[2] not in ("current", "max"):
                continue
            v = _read_uint(self._f(name), max_value=MAX_UINT64)
            if v is None:
                continue
            s = stats.setdefault(parts[1], v2pb.HugeTlbStat(pagesize=parts[1]))
            setattr(s, parts[2], v)
        return list(stats.values())


# --- per-container lookup -----------------------------------------------------------


@dataclass(frozen=True)
class ContainerCgroup:
    """Where a process's cgroups are, resolved once (as the Go shim does at create)."""

    mode: Mode
    paths: dict[str, str] = field(repr=False)  # /proc/PID/cgroup, "" = unified
    root: str = CGROUP_ROOT
    proc: str = PROC

    @property
    def version(self) -> Literal[1, 2]:
        """2 only on a unified host; hybrid hosts use v1 (like containerd)."""
        return 2 if self.mode == "v2" else 1

    @property
    def memory_dir(self) -> str | None:
        """The memory cgroup directory OOM watching uses (None if not in one)."""
        if self.version == 2:
            rel = self.paths.get("")
            return None if rel is None else os.path.join(self.root, rel.lstrip("/"))
        rel = self.paths.get("memory")
        return None if rel is None else v1_controller_dir(self.root, "memory", rel)

    def manager(self) -> CgroupV1 | CgroupV2:
        if self.version == 2:
            if "" not in self.paths:
                raise FileNotFoundError(errno.ENOENT, "process has no cgroup v2 path")
            return CgroupV2(self.paths[""], self.root)
        return CgroupV1(self.paths, self.root, proc=self.proc)

    def metrics_any(self, network: list[v1pb.NetworkStat] | None = None) -> any_pb2.Any:
        """Metrics as containerd expects them; ``network`` (v1 NetworkStat) only fits v1's schema."""
        mgr = self.manager()
        if isinstance(mgr, CgroupV2):
            return any_pb2.Any(type_url=V2_TYPE_URL, value=mgr.metrics().SerializeToString())
        metrics = mgr.metrics()
        if network:
            metrics.network.extend(network)
        return any_pb2.Any(type_url=V1_TYPE_URL, value=metrics.SerializeToString())


def container_cgroup(
    pid: int,
    *,
    root: str = CGROUP_ROOT,
    proc: str = PROC,
    mountinfo: str = MOUNTINFO,
    mode: Mode | None = None,
) -> ContainerCgroup:
    """Resolve ``pid``'s cgroups (mode detected from ``mountinfo`` unless given)."""
    if mode is None:
        mode = _host_mode() if (root, mountinfo) == (CGROUP_ROOT, MOUNTINFO) else cgroup_mode(root, mountinfo=mountinfo)
    return ContainerCgroup(mode=mode, paths=cgroup_paths(pid, proc), root=root, proc=proc)
