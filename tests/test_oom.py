"""shim.daemon.oom: v2 memory.events watching and v1 eventfd watching (fake trees), plus one
real cgroup v1 OOM when running as root on a host with a v1 memory hierarchy."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio
import trio.testing

from shim.daemon import cgroups, oom

MEMORY_EVENTS = "low 0\nhigh {high}\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"


def events_text(high=0, max=0, oom_=0, kill=0) -> str:
    return MEMORY_EVENTS.format(high=high, max=max, oom=oom_, kill=kill)


def write_in_place(path: Path, text: str) -> None:
    # like kernfs: same inode (a rename would look like a deleted cgroup to inotify)
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)


async def wait_for(pred, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


def test_parse_helpers(tmp_path: Path) -> None:
    f = tmp_path / "memory.events"
    f.write_text(events_text(high=3, oom_=2, kill=1))
    assert oom.read_oom_kill_count(str(f)) == 1
    f.write_text("low 0\nhigh 0\nmax 4\noom 2\n")  # kernels before oom_kill existed
    assert oom.read_oom_kill_count(str(f)) == 2
    assert oom.read_oom_kill_count(str(tmp_path / "gone")) is None
    assert cgroups.parse_oom_control("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n").oom_kill == 4


# --- cgroup v2 --------------------------------------------------------------------------


def make_v2(tmp_path: Path, pid: int) -> tuple[Path, str]:
    cg = tmp_path / "cg" / "kubepods" / "c1"
    cg.mkdir(parents=True)
    (cg / "memory.events").write_text(events_text())
    (cg / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    proc = tmp_path / "proc" / str(pid)
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("0::/kubepods/c1\n")
    return cg, str(tmp_path / "proc")


class ReadLog:
    """Records each memory.events read of the watcher (``oom.read_oom_kill_count``).

    The watcher reads the file and decides to fire in one step, with no
    checkpoint in between: once a read made after a write is logged, whatever
    the watcher does about that content (fire or not) has been done.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: list[int | None] = []
        real = oom.read_oom_kill_count

        def spy(path: str) -> int | None:
            count = real(path)
            self.counts.append(count)
            return count

        monkeypatch.setattr(oom, "read_oom_kill_count", spy)

    async def write_and_wait_read(self, path: Path, text: str) -> int | None:
        """Write ``text`` to ``path``; return the count of the watcher's first read after it."""
        seen = len(self.counts)
        write_in_place(path, text)
        await wait_for(lambda: len(self.counts) > seen)
        return self.counts[seen]


@pytest.mark.parametrize("use_inotify", [True, False])
async def test_v2_fires_when_oom_kill_increases(tmp_path: Path, use_inotify: bool, monkeypatch) -> None:
    cg, proc = make_v2(tmp_path, 4242)
    reads = ReadLog(monkeypatch)
    fired: list[str] = []
    w = oom.OOMWatcher(
        root=str(tmp_path / "cg"), proc=proc, mode="v2", poll_interval=0.02, use_inotify=use_inotify
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        w.add("c1", 4242, fired.append)
        assert "c1" in w
        if not use_inotify:  # polling reads the untouched file too: oom_kill 0 is no OOM
            await wait_for(lambda: len(reads.counts) > 0)
        assert fired == []

        # no OOM kill: the watcher has read this content, and did not fire
        assert await reads.write_and_wait_read(cg / "memory.events", events_text(high=5, max=2)) == 0
        assert fired == []

        write_in_place(cg / "memory.events", events_text(high=5, max=3, oom_=1, kill=1))
        await wait_for(lambda: fired == ["c1"])
        # unchanged count: read, and no new event
        assert await reads.write_and_wait_read(cg / "memory.events", events_text(high=6, max=3, oom_=1, kill=1)) == 1
        assert fired == ["c1"]

        write_in_place(cg / "memory.events", events_text(high=6, max=4, oom_=3, kill=3))
        await wait_for(lambda: fired == ["c1", "c1"])

        # cgroup removed: the watch ends by itself
        (cg / "memory.events").unlink()
        await wait_for(lambda: "c1" not in w)
        assert fired == ["c1", "c1"]
        nursery.cancel_scope.cancel()


async def test_v2_stops_when_cgroup_empty_and_remove(tmp_path: Path) -> None:
    cg, proc = make_v2(tmp_path, 1)
    fired: list[str] = []
    w = oom.OOMWatcher(root=str(tmp_path / "cg"), proc=proc, mode="v2")
    w.add("early", 1, fired.append)  # before run(): queued
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        w.add_cgroup("other", str(cg), 2, fired.append)
        assert "early" in w and "other" in w
        w.remove("other")
        w.remove("nope")
        assert "other" not in w
        # the last process died of an OOM kill: report it, then stop (cgroup empty)
        (cg / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        write_in_place(cg / "memory.events", events_text(max=1, oom_=1, kill=1))
        await wait_for(lambda: "early" not in w)
        assert fired == ["early"]
        nursery.cancel_scope.cancel()
    with pytest.raises(RuntimeError):
        w.add_cgroup("late", str(cg), 2, fired.append)


def make_v2_cgroups(tmp_path: Path, n: int) -> list[Path]:
    """``n`` v2 cgroups side by side (what a shim serving a namespace watches)."""
    made = []
    for i in range(n):
        cg = tmp_path / "cg" / "ns" / f"c{i}"
        cg.mkdir(parents=True)
        (cg / "memory.events").write_text(events_text())
        (cg / "cgroup.events").write_text("populated 1\nfrozen 0\n")
        made.append(cg)
    return made


def inotify_instances() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if _link(f"/proc/self/fd/{fd}") == "anon_inode:inotify")


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


async def test_v2_one_inotify_instance_for_every_cgroup(tmp_path: Path) -> None:
    """Issue 16: root's ``fs.inotify.max_user_instances`` (128 for all processes together)
    must not bound the tasks one shim serves: one instance, one watch per cgroup. (Tested on
    a tmp tree only: this machine's cgroup v2 mount is empty, its containers are on v1.)"""
    cgs = make_v2_cgroups(tmp_path, 5)
    fired: list[str] = []
    w = oom.OOMWatcher(root=str(tmp_path / "cg"), mode="v2")
    before = inotify_instances()
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for i, cg in enumerate(cgs):
            w.add_cgroup(f"c{i}", str(cg), 2, fired.append)
        assert inotify_instances() == before + 1
        write_in_place(cgs[3] / "memory.events", events_text(max=1, oom_=1, kill=1))
        await wait_for(lambda: fired == ["c3"])
        write_in_place(cgs[0] / "memory.events", events_text(max=1, oom_=1, kill=1))
        await wait_for(lambda: fired == ["c3", "c0"])
        # a removed watch stops waking its task; the others still fire
        w.remove("c1")
        (cgs[4] / "memory.events").unlink()  # cgroup gone: its watch ends by itself
        await wait_for(lambda: "c4" not in w)
        write_in_place(cgs[2] / "memory.events", events_text(max=1, oom_=1, kill=1))
        await wait_for(lambda: fired == ["c3", "c0", "c2"])
        nursery.cancel_scope.cancel()
    assert inotify_instances() == before  # closed with the watcher


async def test_v2_without_inotify_polls_and_says_so_once(tmp_path: Path, monkeypatch, caplog) -> None:
    def no_instance_left() -> None:
        raise OSError(errno.EMFILE, "inotify_init1: Too many open files")

    monkeypatch.setattr(oom, "_Inotify", no_instance_left)
    cgs = make_v2_cgroups(tmp_path, 3)
    fired: list[str] = []
    w = oom.OOMWatcher(root=str(tmp_path / "cg"), mode="v2", poll_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for i, cg in enumerate(cgs):
            w.add_cgroup(f"c{i}", str(cg), 2, fired.append)
        write_in_place(cgs[1] / "memory.events", events_text(max=1, oom_=1, kill=1))
        await wait_for(lambda: fired == ["c1"])
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.name == "shim.oom" and "polling" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_add_errors(tmp_path: Path) -> None:
    cg, proc = make_v2(tmp_path, 5)
    w = oom.OOMWatcher(root=str(tmp_path / "cg"), proc=proc, mode="v2")
    with pytest.raises(FileNotFoundError):
        w.add("x", 6, print)  # no such process
    (cg / "memory.events").unlink()
    with pytest.raises(FileNotFoundError):
        w.add("x", 5, print)  # no memory controller / cgroup gone
    w1 = oom.OOMWatcher(root=str(tmp_path / "cg"), proc=proc, mode="v1")
    with pytest.raises(FileNotFoundError):
        w1.add("x", 5, print)  # only a 0:: line: no v1 memory cgroup
    assert "x" not in w and "x" not in w1


# --- cgroup v1, with a fake tree: the eventfd is signalled by the test --------------------


async def test_v1_eventfd_fake_tree(tmp_path: Path) -> None:
    mem = tmp_path / "cg" / "memory" / "default" / "c1"
    mem.mkdir(parents=True)
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (mem / "cgroup.event_control").write_text("")
    (tmp_path / "proc" / "9").mkdir(parents=True)
    (tmp_path / "proc" / "9" / "cgroup").write_text("4:memory:/default/c1\n0::/\n")
    fired: list[str] = []
    w = oom.OOMWatcher(root=str(tmp_path / "cg"), proc=str(tmp_path / "proc"), mode="hybrid")
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        w.add("c1", 9, fired.append)
        efd, ofd = map(int, (mem / "cgroup.event_control").read_text().split())
        assert efd != ofd
        os.eventfd_write(efd, 1)  # what the kernel does on OOM
        await wait_for(lambda: fired == ["c1"])
        os.eventfd_write(efd, 1)
        await wait_for(lambda: fired == ["c1", "c1"])
        # cgroup removed: the kernel signals the eventfd too; not an OOM
        (mem / "memory.oom_control").unlink()
        os.eventfd_write(efd, 1)
        await wait_for(lambda: "c1" not in w)
        assert fired == ["c1", "c1"]
        with pytest.raises(OSError):
            os.fstat(efd)  # closed by the watcher
        nursery.cancel_scope.cancel()


# --- cgroup v1, for real ---------------------------------------------------------------------

V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _real_v1_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if cgroups.cgroup_mode() == "v2":
        return "host is cgroup v2 only"
    if not (V1_MEMORY / "cgroup.event_control").is_file():
        return "no cgroup v1 memory hierarchy"
    return None


@pytest.mark.skipif(_real_v1_available() is not None, reason=str(_real_v1_available()))
async def test_v1_real_oom() -> None:
    cg = V1_MEMORY / f"shim-py-oom-test-{uuid.uuid4().hex[:12]}"
    cg.mkdir()
    proc = None
    fired: list[str] = []
    try:
        limit = str(32 << 20)
        (cg / "memory.limit_in_bytes").write_text(limit)
        if (cg / "memory.memsw.limit_in_bytes").exists():
            (cg / "memory.memsw.limit_in_bytes").write_text(limit)
        try:
            (cg / "memory.swappiness").write_text("0")
        except OSError:
            pass
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", "import sys; sys.stdin.readline(); b = b'x' * (200 << 20)"],
            stdin=subprocess.PIPE,
        )
        (cg / "cgroup.procs").write_text(str(proc.pid))
        w = oom.OOMWatcher()
        async with trio.open_nursery() as nursery:
            await nursery.start(w.run)
            w.add("real", proc.pid, fired.append)
            assert "real" in w
            await proc.stdin.send_all(b"go\n")
            await wait_for(lambda: bool(fired), timeout=30)
            with trio.fail_after(30):
                await proc.wait()
            assert proc.returncode == -9  # killed by the memcg OOM killer
            oom_kill = cgroups.parse_oom_control((cg / "memory.oom_control").read_text()).oom_kill
            assert oom_kill >= 1
            # removing the cgroup signals the eventfd as well: the watch ends, no extra OOM
            n = len(fired)
            cg.rmdir()
            await wait_for(lambda: "real" not in w, timeout=10)
            assert len(fired) == n
            nursery.cancel_scope.cancel()
        assert set(fired) == {"real"}
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
        if cg.exists():
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    await trio.sleep(0.1)


async def test_v1_one_epoll_and_one_task_for_every_cgroup(tmp_path: Path) -> None:
    """A namespace shim watches thousands of v1 cgroups: their eventfds share one epoll set
    read by one task (a task per cgroup cost ~3 KiB each); each still fires alone."""
    fired: list[str] = []
    w = oom.OOMWatcher(root=str(tmp_path / "cg"), proc=str(tmp_path / "proc"), mode="hybrid")
    efds = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for i in range(5):
            mem = tmp_path / "cg" / "memory" / "default" / f"c{i}"
            mem.mkdir(parents=True)
            (mem / "memory.oom_control").write_text("oom_kill_disable 0\n")
            (mem / "cgroup.event_control").write_text("")
            (tmp_path / "proc" / str(10 + i)).mkdir(parents=True)
            (tmp_path / "proc" / str(10 + i) / "cgroup").write_text(f"4:memory:/default/c{i}\n0::/\n")
            w.add(f"c{i}", 10 + i, fired.append)
            efds[f"c{i}"] = int((mem / "cgroup.event_control").read_text().split()[0])
        await trio.testing.wait_all_tasks_blocked()
        assert len(w._nursery.child_tasks) == 1  # type: ignore[union-attr]
        os.eventfd_write(efds["c3"], 1)
        await wait_for(lambda: fired == ["c3"])
        w.remove("c3")
        with pytest.raises(OSError):
            os.fstat(efds["c3"])  # closed (and out of the epoll set) by remove
        os.eventfd_write(efds["c1"], 1)
        await wait_for(lambda: fired == ["c3", "c1"])
        nursery.cancel_scope.cancel()
