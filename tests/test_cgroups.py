"""shim.daemon.cgroups against fake cgroup trees (v1 and v2 layouts, real file formats),
plus the io.containerd.cgroups.v1/v2 Metrics schemas."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from shim.daemon import cgroups
from shim.proto import cgroups_v1_metrics_pb2 as v1pb
from shim.proto import cgroups_v2_metrics_pb2 as v2pb

MAX64 = (1 << 64) - 1


def write(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


# --- proto schemas ------------------------------------------------------------------

CGROUPS_SRC = Path("/usr/share/gocode/src/github.com/containerd/cgroups")
_FIELD = re.compile(r"^\s*(repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)")
_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
}


def _parse_proto(text: str) -> dict[str, dict[str, tuple[str, int, bool]]]:
    text = re.sub(r"//[^\n]*", "", text)
    out: dict[str, dict[str, tuple[str, int, bool]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^message\s+(\w+)", line):
            current = out.setdefault(m.group(1), {})
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _FIELD.match(line)):
            rep, typ, name, num = m.groups()
            current[name] = (typ, int(num), bool(rep))
    return out


def _ours(module) -> dict[str, dict[str, tuple[str, int, bool]]]:
    return {
        name: {
            f.name: (
                f.message_type.name if f.message_type else _SCALARS[f.type],
                f.number,
                f.is_repeated,
            )
            for f in msg.fields
        }
        for name, msg in module.DESCRIPTOR.message_types_by_name.items()
    }


@pytest.mark.parametrize(
    ("module", "source"),
    [(v1pb, "stats/v1/metrics.proto"), (v2pb, "v2/stats/metrics.proto")],
)
def test_metrics_proto_matches_containerd_cgroups(module, source: str) -> None:
    path = CGROUPS_SRC / source
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert _ours(module) == _parse_proto(path.read_text())


def test_metrics_full_names_and_field_numbers() -> None:
    assert v1pb.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert v2pb.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"
    f1 = v1pb.Metrics.DESCRIPTOR.fields_by_name
    assert f1["memory_oom_control"].number == 9
    assert f1["memory_oom_control"].message_type is v1pb.MemoryOomControl.DESCRIPTOR
    assert [(f.name, f.number) for f in v1pb.MemoryOomControl.DESCRIPTOR.fields] == [
        ("oom_kill_disable", 1), ("under_oom", 2), ("oom_kill", 3),
    ]  # fmt: skip
    f2 = v2pb.Metrics.DESCRIPTOR.fields_by_name
    assert f2["memory_events"].number == 8
    assert "3" not in {str(f.number) for f in v2pb.Metrics.DESCRIPTOR.fields}  # no field 3
    assert [(f.name, f.number) for f in v2pb.MemoryEvents.DESCRIPTOR.fields] == [
        ("low", 1), ("high", 2), ("max", 3), ("oom", 4), ("oom_kill", 5),
    ]  # fmt: skip


def test_metrics_wire_bytes() -> None:
    m1 = v1pb.Metrics(memory_oom_control=v1pb.MemoryOomControl(oom_kill=2))
    assert m1.SerializeToString() == b"\x4a\x02\x18\x02"
    m2 = v2pb.Metrics(memory_events=v2pb.MemoryEvents(oom_kill=1), pids=v2pb.PidsStat(limit=5))
    assert m2.SerializeToString() == b"\x0a\x02\x10\x05\x42\x02\x28\x01"


# --- mode detection -------------------------------------------------------------------

HYBRID_MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
V1_MOUNTINFO = "\n".join(HYBRID_MOUNTINFO.splitlines()[:-1]) + "\n"


@pytest.mark.parametrize(
    ("text", "mode"),
    [(HYBRID_MOUNTINFO, "hybrid"), (V2_MOUNTINFO, "v2"), (V1_MOUNTINFO, "v1")],
)
def test_cgroup_mode_from_mountinfo(tmp_path: Path, text: str, mode: str) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(text)
    assert cgroups.cgroup_mode("/sys/fs/cgroup", mountinfo=str(mi)) == mode
    assert cgroups.cgroup_mode("/sys/fs/cgroup/", mountinfo=str(mi)) == mode


def test_cgroup_mode_later_mount_shadows_and_escapes(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "26 22 0:23 / /my\\040cg rw - cgroup2 cgroup2 rw\n"
        "27 26 0:24 / /my\\040cg rw - tmpfs tmpfs rw\n"
        "28 27 0:25 / /my\\040cg/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroups.cgroup_mode("/my cg", mountinfo=str(mi)) == "hybrid"
    assert cgroups.cgroup_mode("/elsewhere", mountinfo=str(mi)) == "v1"


def test_cgroup_mode_without_mountinfo_falls_back_to_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert cgroups.cgroup_mode(str(tmp_path), mountinfo=missing) == "v1"
    write(tmp_path / "unified", {"cgroup.controllers": ""})
    assert cgroups.cgroup_mode(str(tmp_path), mountinfo=missing) == "hybrid"
    write(tmp_path, {"cgroup.controllers": "cpu memory pids\n"})
    assert cgroups.cgroup_mode(str(tmp_path), mountinfo=missing) == "v2"


def test_cgroup_mode_of_this_host_is_valid() -> None:
    assert cgroups.cgroup_mode() in ("v1", "v2", "hybrid")


# --- /proc/PID/cgroup ------------------------------------------------------------------

PROC_CGROUP_HYBRID = """\
12:hugetlb:/default/c1
11:net_cls,net_prio:/default/c1
9:name=systemd:/system.slice/containerd.service
8:pids:/default/c1
7:blkio:/default/c1
4:memory:/default/c1
2:cpu,cpuacct:/default/c1
0::/system.slice/containerd.service
"""


def test_cgroup_paths(tmp_path: Path) -> None:
    write(tmp_path / "1234", {"cgroup": PROC_CGROUP_HYBRID})
    paths = cgroups.cgroup_paths(1234, proc=str(tmp_path))
    assert paths == {
        "hugetlb": "/default/c1",
        "net_cls": "/default/c1",
        "net_prio": "/default/c1",
        "name=systemd": "/system.slice/containerd.service",
        "pids": "/default/c1",
        "blkio": "/default/c1",
        "memory": "/default/c1",
        "cpu": "/default/c1",
        "cpuacct": "/default/c1",
        "": "/system.slice/containerd.service",
    }
    assert cgroups.parse_cgroup_file("0::/kubepods/pod1/c2\n") == {"": "/kubepods/pod1/c2"}
    assert cgroups.parse_cgroup_file("garbage\n1:pids:/a:b\n") == {"pids": "/a:b"}
    with pytest.raises(FileNotFoundError):
        cgroups.cgroup_paths(99999, proc=str(tmp_path))


def test_v1_controller_dir() -> None:
    assert cgroups.v1_controller_dir("/r", "memory", "/a/b") == "/r/memory/a/b"
    assert cgroups.v1_controller_dir("/r", "name=systemd", "/") == "/r/systemd/"


# --- v1 metrics -------------------------------------------------------------------------

V1_MEMORY = {
    "memory.stat": """\
cache 10113024
rss 5484544
rss_huge 2097152
shmem 9084928
mapped_file 7569408
dirty 4096
writeback 8192
workingset_refault_anon 0
swap 0
pgpgin 49232
pgpgout 45462
pgfault 68953
pgmajfault 7
inactive_anon 11
active_anon 1531904
inactive_file 307200
active_file 720896
unevictable 13037568
hierarchical_memory_limit 9223372036854771712
hierarchical_memsw_limit 9223372036854771712
total_cache 534945792
total_rss 9830400
total_rss_huge 4194304
total_shmem 9084928
total_mapped_file 10956800
total_dirty 163840
total_writeback 12
total_pgpgin 16944400
total_pgpgout 16825622
total_pgfault 26190510
total_pgmajfault 1333
total_inactive_anon 4259840
total_active_anon 1560576
total_inactive_file 294785024
total_active_file 13
total_unevictable 14
""",
    "memory.oom_control": "oom_kill_disable 0\nunder_oom 1\noom_kill 3\n",
    "memory.usage_in_bytes": "12603392\n",
    "memory.max_usage_in_bytes": "13049856\n",
    "memory.limit_in_bytes": "67108864\n",
    "memory.failcnt": "42\n",
    "memory.memsw.usage_in_bytes": "12603393\n",
    "memory.memsw.max_usage_in_bytes": "13049857\n",
    "memory.memsw.limit_in_bytes": "134217728\n",
    "memory.memsw.failcnt": "0\n",
    "memory.kmem.usage_in_bytes": "765952\n",
    "memory.kmem.max_usage_in_bytes": "3346432\n",
    "memory.kmem.limit_in_bytes": "9223372036854771712\n",
    "memory.kmem.failcnt": "0\n",
    # no memory.kmem.tcp.* at all: skipped
}
V1_BLKIO_CFQ = {
    "blkio.io_serviced_recursive": "8:0 Read 10\n8:0 Write 20\n8:0 Sync 25\n8:0 Async 5\n8:0 Total 30\nTotal 30\n",
    "blkio.io_service_bytes_recursive": "8:0 Read 40960\n8:0 Write 81920\n8:0 Total 122880\nTotal 122880\n",
    "blkio.sectors_recursive": "8:0 240\n",
    "blkio.time_recursive": "8:0 17\n",
    # io_queued/service_time/wait_time/merged missing: tolerated
}
V1_BLKIO_THROTTLE_ONLY = {
    "blkio.throttle.io_serviced": "254:0 Read 3\n254:0 Write 4\n254:0 Sync 7\n254:0 Async 0\n254:0 Discard 0\n254:0 Total 7\nTotal 7\n",
    "blkio.throttle.io_service_bytes": "254:0 Read 12288\n254:0 Write 16384\n254:0 Total 28672\nTotal 28672\n",
}
PARTITIONS = """\
major minor  #blocks  name

 254        0  268435456 vda
   8        0  976762584 sda
   8        1     524288 sda1
"""


def make_v1_tree(root: Path, rel: str = "default/c1", *, blkio=V1_BLKIO_CFQ) -> None:
    write(root / "cpuacct" / rel, {
        "cpuacct.usage": "467778242067\n",
        "cpuacct.usage_percpu": "212728921011 255049321056 \n",
        "cpuacct.stat": "user 29087\nsystem 17689\n",
    })  # fmt: skip
    # cpu and cpuacct co-mounted: /sys/fs/cgroup/cpu is normally a symlink to cpu,cpuacct
    write(root / "cpu" / rel, {
        "cpu.stat": "nr_periods 120\nnr_throttled 7\nthrottled_time 123456789\nnr_bursts 0\nburst_time 0\n",
    })  # fmt: skip
    write(root / "memory" / rel, V1_MEMORY)
    write(root / "pids" / rel, {"pids.current": "5\n", "pids.max": "max\n"})
    write(root / "blkio" / rel, blkio)


def test_v1_metrics(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    make_v1_tree(root)
    write(tmp_path / "proc", {"partitions": PARTITIONS})
    paths = cgroups.parse_cgroup_file(PROC_CGROUP_HYBRID)
    m = cgroups.CgroupV1(paths, str(root), proc=str(tmp_path / "proc")).metrics()

    ticks = cgroups._CLOCK_TICKS
    assert m.cpu.usage == v1pb.CPUUsage(
        total=467778242067,
        per_cpu=[212728921011, 255049321056],
        user=29087 * 1_000_000_000 // ticks,
        kernel=17689 * 1_000_000_000 // ticks,
    )
    assert m.cpu.throttling == v1pb.Throttle(periods=120, throttled_periods=7, throttled_time=123456789)

    mem = m.memory
    assert (mem.cache, mem.rss, mem.rss_huge, mem.mapped_file) == (10113024, 5484544, 2097152, 7569408)
    assert (mem.dirty, mem.writeback, mem.pg_pg_in, mem.pg_pg_out) == (4096, 8192, 49232, 45462)
    assert (mem.pg_fault, mem.pg_maj_fault, mem.inactive_anon, mem.unevictable) == (68953, 7, 11, 13037568)
    assert mem.hierarchical_memory_limit == mem.hierarchical_swap_limit == 9223372036854771712
    assert (mem.total_cache, mem.total_rss, mem.total_rss_huge) == (534945792, 9830400, 4194304)
    assert (mem.total_writeback, mem.total_pg_pg_in, mem.total_pg_maj_fault) == (12, 16944400, 1333)
    assert (mem.total_active_file, mem.total_unevictable) == (13, 14)
    assert mem.usage == v1pb.MemoryEntry(limit=67108864, usage=12603392, max=13049856, failcnt=42)
    assert mem.swap == v1pb.MemoryEntry(limit=134217728, usage=12603393, max=13049857)
    assert mem.kernel == v1pb.MemoryEntry(limit=9223372036854771712, usage=765952, max=3346432)
    assert mem.HasField("kernel_tcp") and mem.kernel_tcp == v1pb.MemoryEntry()
    assert m.memory_oom_control == v1pb.MemoryOomControl(oom_kill_disable=0, under_oom=1, oom_kill=3)

    assert m.pids == v1pb.PidsStat(current=5, limit=0)  # "max" -> 0

    b = m.blkio
    assert list(b.io_serviced_recursive) == [
        v1pb.BlkIOEntry(op=op, device="/dev/sda", major=8, minor=0, value=v)
        for op, v in [("Read", 10), ("Write", 20), ("Sync", 25), ("Async", 5), ("Total", 30)]
    ]
    assert [e.value for e in b.io_service_bytes_recursive] == [40960, 81920, 122880]
    assert list(b.sectors_recursive) == [v1pb.BlkIOEntry(device="/dev/sda", major=8, minor=0, value=240)]
    assert [e.value for e in b.io_time_recursive] == [17]
    assert not b.io_queued_recursive and not b.io_merged_recursive

    assert not m.HasField("rdma") and not m.hugetlb  # not in the tree / no hugetlb mount
    # round trip through the wire
    assert v1pb.Metrics.FromString(m.SerializeToString()) == m


def test_v1_blkio_throttle_fallback_and_hugetlb(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    make_v1_tree(root, blkio=V1_BLKIO_THROTTLE_ONLY)
    write(root / "hugetlb" / "default/c1", {
        "hugetlb.2MB.usage_in_bytes": "4194304\n",
        "hugetlb.2MB.max_usage_in_bytes": "6291456\n",
        "hugetlb.2MB.failcnt": "1\n",
        "hugetlb.2MB.limit_in_bytes": "9223372036854771712\n",
        "hugetlb.2MB.rsvd.usage_in_bytes": "0\n",
        "hugetlb.1GB.usage_in_bytes": "0\n",
        "hugetlb.1GB.max_usage_in_bytes": "0\n",
        "hugetlb.1GB.failcnt": "0\n",
    })  # fmt: skip
    m = cgroups.CgroupV1(
        cgroups.parse_cgroup_file(PROC_CGROUP_HYBRID), str(root), proc=str(tmp_path / "noproc")
    ).metrics()
    # no /proc/partitions: device names are left empty
    assert [(e.op, e.major, e.minor, e.value, e.device) for e in m.blkio.io_serviced_recursive] == [
        ("Read", 254, 0, 3, ""), ("Write", 254, 0, 4, ""), ("Sync", 254, 0, 7, ""),
        ("Async", 254, 0, 0, ""), ("Discard", 254, 0, 0, ""), ("Total", 254, 0, 7, ""),
    ]  # fmt: skip
    assert [e.value for e in m.blkio.io_service_bytes_recursive] == [12288, 16384, 28672]
    assert list(m.hugetlb) == [
        v1pb.HugetlbStat(pagesize="1GB"),
        v1pb.HugetlbStat(pagesize="2MB", usage=4194304, max=6291456, failcnt=1),
    ]


def test_v1_missing_controllers_and_files_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "memory" / "c", {"memory.oom_control": "oom_kill_disable 1\nunder_oom 0\n"})
    write(root / "pids" / "c", {"pids.current": "-1\n"})  # negative reads as 0
    (root / "cpu").mkdir()  # mounted, but the cgroup dir is gone
    m = cgroups.CgroupV1({"memory": "/c", "pids": "/c", "cpu": "/c", "blkio": "/c"}, str(root)).metrics()
    assert m.cpu == v1pb.CPUStat(usage=v1pb.CPUUsage(), throttling=v1pb.Throttle())
    assert m.memory_oom_control == v1pb.MemoryOomControl(oom_kill_disable=1)
    assert m.memory.usage == v1pb.MemoryEntry() and m.memory.cache == 0
    assert m.pids == v1pb.PidsStat(current=0, limit=0)
    assert not m.HasField("blkio")
    assert cgroups.CgroupV1({}, str(tmp_path / "none")).metrics() == v1pb.Metrics(
        cpu=v1pb.CPUStat(usage=v1pb.CPUUsage(), throttling=v1pb.Throttle())
    )


def test_parse_oom_control() -> None:
    assert cgroups.parse_oom_control("oom_kill_disable 0\nunder_oom 0\noom_kill 12\n") == (
        v1pb.MemoryOomControl(oom_kill=12)
    )
    # pre-4.13 kernels have no oom_kill line
    assert cgroups.parse_oom_control("oom_kill_disable 1\nunder_oom 1\n") == (
        v1pb.MemoryOomControl(oom_kill_disable=1, under_oom=1)
    )


# --- v2 metrics -------------------------------------------------------------------------

V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
    "cgroup.events": "populated 1\nfrozen 0\n",
    "cpu.stat": (
        "usage_usec 474502493\nuser_usec 297211641\nsystem_usec 177290851\n"
        "core_sched.force_idle_usec 0\nnr_periods 10\nnr_throttled 2\nthrottled_usec 3000\n"
        "nr_bursts 0\nburst_usec 0\n"
    ),
    "memory.current": "8519680\n",
    "memory.max": "max\n",
    "memory.swap.current": "4096\n",
    "memory.swap.max": "1073741824\n",
    "memory.events": "low 0\nhigh 4\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n",
    "memory.stat": """\
anon 4759552
file 3248128
kernel 491520
kernel_stack 81920
pagetables 110592
sec_pagetables 0
percpu 0
sock 4096
vmalloc 0
shmem 8192
zswap 0
zswapped 0
file_mapped 1617920
file_dirty 12288
file_writeback 16384
swapcached 0
anon_thp 2097152
file_thp 0
shmem_thp 0
inactive_anon 4751360
active_anon 8192
inactive_file 1622016
active_file 1626112
unevictable 20480
slab_reclaimable 163840
slab_unreclaimable 131072
slab 294912
workingset_refault_anon 0
workingset_refault_file 0
workingset_activate_anon 0
workingset_activate_file 0
workingset_restore_anon 0
workingset_restore_file 0
workingset_nodereclaim 3
pgscan 21
pgsteal 22
pgscan_kswapd 0
pgscan_direct 0
pgsteal_kswapd 0
pgsteal_direct 0
pgfault 5814
pgmajfault 27
pgrefill 23
pgactivate 26
pgdeactivate 27
pglazyfree 28
pglazyfreed 29
thp_fault_alloc 30
thp_collapse_alloc 31
""",
    "pids.current": "3\n",
    "pids.max": "max\n",
    "io.stat": (
        "254:0 rbytes=3301376 wbytes=0 rios=150 wios=0 dbytes=0 dios=0\n"
        "8:16 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6\n"
    ),
    "rdma.current": "mlx4_0 hca_handle=1 hca_object=20\n",
    "rdma.max": "mlx4_0 hca_handle=2 hca_object=max\n",
    "hugetlb.2MB.current": "2097152\n",
    "hugetlb.2MB.max": "max\n",
    "hugetlb.2MB.rsvd.current": "0\n",
    "hugetlb.2MB.events": "max 0\n",
}


def test_v2_metrics(tmp_path: Path) -> None:
    write(tmp_path / "kubepods/pod1/c2", V2_FILES)
    m = cgroups.CgroupV2("/kubepods/pod1/c2", str(tmp_path)).metrics()
    assert m.pids == v2pb.PidsStat(current=3, limit=MAX64)  # v2: "max" -> MaxUint64
    assert m.cpu == v2pb.CPUStat(
        usage_usec=474502493, user_usec=297211641, system_usec=177290851,
        nr_periods=10, nr_throttled=2, throttled_usec=3000,
    )  # fmt: skip
    mem = m.memory
    assert (mem.anon, mem.file, mem.kernel_stack, mem.slab, mem.sock) == (4759552, 3248128, 81920, 294912, 4096)
    assert (mem.shmem, mem.file_mapped, mem.file_dirty, mem.file_writeback) == (8192, 1617920, 12288, 16384)
    assert (mem.anon_thp, mem.unevictable, mem.slab_reclaimable, mem.slab_unreclaimable) == (
        2097152, 20480, 163840, 131072,
    )  # fmt: skip
    assert (mem.pgfault, mem.pgmajfault, mem.workingset_nodereclaim, mem.pgscan) == (5814, 27, 3, 21)
    assert (mem.pglazyfreed, mem.thp_fault_alloc, mem.thp_collapse_alloc) == (29, 30, 31)
    assert (mem.usage, mem.usage_limit, mem.swap_usage, mem.swap_limit) == (8519680, MAX64, 4096, 1073741824)
    assert m.memory_events == v2pb.MemoryEvents(low=0, high=4, max=9, oom=2, oom_kill=1)
    assert list(m.io.usage) == [
        v2pb.IOEntry(major=254, minor=0, rbytes=3301376, rios=150),
        v2pb.IOEntry(major=8, minor=16, rbytes=1, wbytes=2, rios=3, wios=4),
    ]
    assert list(m.rdma.current) == [v2pb.RdmaEntry(device="mlx4_0", hca_handles=1, hca_objects=20)]
    assert list(m.rdma.limit) == [v2pb.RdmaEntry(device="mlx4_0", hca_handles=2, hca_objects=(1 << 32) - 1)]
    assert list(m.hugetlb) == [v2pb.HugeTlbStat(pagesize="2MB", current=2097152, max=MAX64)]
    assert v2pb.Metrics.FromString(m.SerializeToString()) == m


def test_v2_metrics_missing_files(tmp_path: Path) -> None:
    write(tmp_path / "c", {"cpu.stat": "usage_usec 5\nuser_usec 3\nsystem_usec 2\n"})
    m = cgroups.CgroupV2("c", str(tmp_path)).metrics()
    assert m.cpu == v2pb.CPUStat(usage_usec=5, user_usec=3, system_usec=2)
    assert m.HasField("pids") and m.HasField("memory") and m.HasField("io")
    assert not m.HasField("memory_events")
    assert m.memory == v2pb.MemoryStat()
    # the whole cgroup gone: still a (zero) answer, as containerd gives
    assert cgroups.CgroupV2("gone", str(tmp_path)).metrics().cpu == v2pb.CPUStat()


# --- container_cgroup(...).metrics_any() ---------------------------------------------------


def _fake_proc(tmp_path: Path, pid: int, text: str) -> str:
    write(tmp_path / "proc" / str(pid), {"cgroup": text})
    return str(tmp_path / "proc")


def test_metrics_any_v1_on_hybrid(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    make_v1_tree(root)
    write(root / "unified", {"cgroup.controllers": ""})
    mi = tmp_path / "mountinfo"
    mi.write_text(HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", str(root)))
    proc = _fake_proc(tmp_path, 77, PROC_CGROUP_HYBRID)
    a = cgroups.container_cgroup(77, root=str(root), proc=proc, mountinfo=str(mi)).metrics_any()
    assert a.type_url == "io.containerd.cgroups.v1.Metrics"
    m = v1pb.Metrics.FromString(a.value)
    assert m.memory_oom_control.oom_kill == 3 and m.pids.current == 5

    cg = cgroups.container_cgroup(77, root=str(root), proc=proc, mountinfo=str(mi))
    assert cg.mode == "hybrid" and cg.version == 1
    assert cg.memory_dir == str(root / "memory" / "default/c1")


def test_metrics_any_v2(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "kubepods/pod1/c2", V2_FILES)
    mi = tmp_path / "mountinfo"
    mi.write_text(V2_MOUNTINFO.replace("/sys/fs/cgroup", str(root)))
    proc = _fake_proc(tmp_path, 78, "0::/kubepods/pod1/c2\n")
    a = cgroups.container_cgroup(78, root=str(root), proc=proc, mountinfo=str(mi)).metrics_any()
    assert a.type_url == "io.containerd.cgroups.v2.Metrics"
    assert v2pb.Metrics.FromString(a.value).memory_events.oom_kill == 1
    cg = cgroups.container_cgroup(78, root=str(root), proc=proc, mode="v2")
    assert cg.version == 2 and cg.memory_dir == str(root / "kubepods/pod1/c2")
    # explicit mode overrides detection
    a1 = cgroups.container_cgroup(78, root=str(root), proc=proc, mode="v1").metrics_any()
    assert a1.type_url == "io.containerd.cgroups.v1.Metrics"


def test_metrics_any_for_this_process() -> None:
    import os

    a = cgroups.container_cgroup(os.getpid()).metrics_any()
    assert a.type_url in (cgroups.V1_TYPE_URL, cgroups.V2_TYPE_URL)
    cls = v1pb.Metrics if a.type_url == cgroups.V1_TYPE_URL else v2pb.Metrics
    cls.FromString(a.value)
