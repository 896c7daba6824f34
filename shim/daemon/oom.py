"""OOM watching for containers' memory cgroups (the Go shim's pkg/oom v1/v2 watchers).

``OOMWatcher.add(key, pid, on_oom)`` resolves the process's memory cgroup once and
calls ``on_oom(key)`` (synchronously, from the watcher's task) for every OOM event:

* cgroup v1 (and hybrid hosts): an eventfd registered through
  ``cgroup.event_control`` against ``memory.oom_control``. The kernel also signals
  it when the cgroup is removed; like containerd we then check whether the cgroup
  still exists, and stop watching (without calling ``on_oom``) if it does not.
  Every cgroup's eventfd sits in one epoll instance read by one task (a task per
  cgroup cost ~3 KiB each in a namespace shim serving thousands).
* cgroup v2: ``memory.events`` is watched with inotify (IN_MODIFY, via ctypes):
  one inotify instance per watcher, one watch per cgroup, one reader task waking
  the cgroup's task. (An instance per cgroup would run into
  ``fs.inotify.max_user_instances``, 128 for all of root's processes together, at
  the 128th container of a shim serving a namespace.) If inotify is unavailable
  (no instance or no watch left) a cgroup is polled every ``poll_interval``
  seconds instead, and that is logged once per watcher. ``on_oom`` is
  called whenever its ``oom_kill`` count (``oom`` on kernels without ``oom_kill``)
  rises above the last non-zero value seen, starting from 0 as containerd does.
  Watching stops when ``memory.events`` disappears or ``cgroup.events`` says
  ``populated 0`` after an event.

Registration (eventfd / inotify watch) happens synchronously in ``add``, so errors
(no memory cgroup, cgroup already gone) are raised to the caller and no event
between ``add`` and the watching task starting is lost. Each watched v2 cgroup is then
a task in the nursery that ``run()`` owns; ``add`` before ``run`` starts is queued.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from shim.common import inotify
from shim.common.config import CGROUP_ROOT
from shim.common.inotify import IN_DELETE_SELF, IN_IGNORED, IN_MODIFY

from . import cgroups
from .fds import Readiness

log = logging.getLogger("shim.oom")

OnOOM = Callable[[str], None]

class _Inotify:
    """One inotify instance: a watch (wd) per cgroup's memory.events, shared by every cgroup."""

    def __init__(self) -> None:
        self.fd = inotify.init()
        #: Who is interested in each watch (two keys may share a cgroup: the kernel gives one wd).
        self.watchers: dict[int, list[_Watch]] = {}

    def add(self, path: str, w: _Watch) -> int:
        wd = inotify.add_watch(self.fd, path, IN_MODIFY | IN_DELETE_SELF)
        self.watchers.setdefault(wd, []).append(w)
        return wd

    def remove(self, wd: int, w: _Watch) -> None:
        watchers = self.watchers.get(wd, [])
        if w in watchers:
            watchers.remove(w)
        if watchers:
            return
        self.watchers.pop(wd, None)
        try:
            inotify.rm_watch(self.fd, wd)
        except OSError:
            pass  # already gone with its cgroup (IN_IGNORED)

    async def run(self) -> None:
        """Wake the cgroup tasks whose memory.events changed."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            for wd, mask in inotify.read_masks(self.fd).items():
                for w in self.watchers.get(wd, ()):
                    w.mask |= mask
                    if w.changed is not None:
                        w.changed.set()

    def close(self) -> None:
        os.close(self.fd)


def register_v1_oom_eventfd(memory_dir: str) -> int:
    """Arm an OOM notification on a v1 memory cgroup; returns the (non-blocking) eventfd."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        ofd = os.open(os.path.join(memory_dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            ctl = os.open(os.path.join(memory_dir, "cgroup.event_control"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(ctl, f"{efd} {ofd}".encode())
            finally:
                os.close(ctl)
        finally:
            os.close(ofd)  # the kernel holds its own reference once registered
    except BaseException:
        os.close(efd)
        raise
    return efd


def read_oom_kill_count(memory_events: str) -> int | None:
    """``oom_kill`` (or ``oom``) from a v2 memory.events file; None if unreadable."""
    try:
        with open(memory_events) as f:
            kv = cgroups.parse_kv(f.read())
    except OSError:
        return None
    return kv.get("oom_kill", kv.get("oom", 0))


def _cgroup_v2_empty(cgroup_dir: str) -> bool:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.events")) as f:
            kv = cgroups.parse_kv(f.read())
    except OSError:
        return False
    return kv.get("populated") == 0


@dataclass(eq=False, slots=True)
class _Watch:
    key: str
    version: Literal[1, 2]
    memory_dir: str
    on_oom: OnOOM
    fd: int | None  # eventfd (v1), or None (v2)
    scope: trio.CancelScope | None = None  # v2: its task's (v1 has no task of its own)
    closed: bool = False
    last_count: int = 0  # v2: oom_kill count already reported
    inotify: _Inotify | None = None  # v2: the watcher's instance, None when polling
    wd: int = -1
    mask: int = 0  # v2: inotify events seen since the task last looked
    changed: trio.Event | None = None  # v2 with inotify: set when memory.events changed
    eventfds: Readiness | None = None  # v1: the watcher's epoll set

    def close(self) -> None:
        if not self.closed:
            if self.eventfds is not None and self.fd is not None:
                self.eventfds.remove(self.fd)
            if self.fd is not None:
                os.close(self.fd)
            if self.inotify is not None:
                self.inotify.remove(self.wd, self)
        self.closed = True


class OOMWatcher:
    def __init__(
        self,
        *,
        root: str = CGROUP_ROOT,
        proc: str = cgroups.PROC,
        mountinfo: str = cgroups.MOUNTINFO,
        mode: cgroups.Mode | None = None,
        poll_interval: float = 0.5,
        recheck_interval: float = 5.0,
        use_inotify: bool = True,
    ) -> None:
        self.root = root
        self.proc = proc
        self.mountinfo = mountinfo
        self.mode = mode
        self.poll_interval = poll_interval
        self.recheck_interval = recheck_interval  # v2 inotify: re-read even without events
        self.use_inotify = use_inotify
        self._watches: dict[str, _Watch] = {}
        self._pending: list[_Watch] = []
        self._nursery: trio.Nursery | None = None
        self._finished = False
        self._inotify: _Inotify | None = None
        self._eventfds: Readiness | None = None
        self._polling_logged = False

    # --- public API -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the per-container tasks until cancelled."""
        if self._nursery is not None or self._finished:
            raise RuntimeError("OOMWatcher.run() called twice")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._inotify is not None:
                    nursery.start_soon(self._inotify.run)
                if self._eventfds is not None:
                    nursery.start_soon(self._eventfds.run)
                pending, self._pending = self._pending, []
                for w in pending:
                    if self._watches.get(w.key) is w:
                        nursery.start_soon(self._watch, w)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._finished = True
            self._nursery = None
            for w in list(self._watches.values()) + self._pending:
                w.close()
            self._watches.clear()
            self._pending.clear()
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            if self._eventfds is not None:
                self._eventfds.close()
                self._eventfds = None

    def add(self, key: str, pid: int, on_oom: OnOOM) -> None:
        """Watch ``pid``'s memory cgroup; ``on_oom(key)`` on each OOM. Replaces ``key``.

        Raises OSError if the cgroup cannot be found or armed (e.g. process gone).
        """
        cg = cgroups.container_cgroup(
            pid, root=self.root, proc=self.proc, mountinfo=self.mountinfo, mode=self.mode
        )
        memory_dir = cg.memory_dir
        if memory_dir is None:
            raise FileNotFoundError(errno.ENOENT, f"process {pid} is in no memory cgroup")
        self.add_cgroup(key, memory_dir, cg.version, on_oom)

    def add_cgroup(self, key: str, memory_dir: str, version: Literal[1, 2], on_oom: OnOOM) -> None:
        """Like :meth:`add`, for a known memory cgroup directory (v1 memory dir or v2 dir)."""
        if self._finished:
            raise RuntimeError("OOMWatcher is no longer running")
        if version == 1:
            fd: int | None = register_v1_oom_eventfd(memory_dir)
        else:
            events = os.path.join(memory_dir, "memory.events")
            if not os.path.isfile(events):
                raise FileNotFoundError(errno.ENOENT, "no memory.events", events)
            fd = None
        w = _Watch(key=key, version=version, memory_dir=memory_dir, on_oom=on_oom, fd=fd)
        self.remove(key)
        if version == 1:
            self._eventfd_watch(w)
            self._watches[key] = w
            return
        w.scope, w.changed = trio.CancelScope(), trio.Event()
        if self.use_inotify:
            self._inotify_watch(w, os.path.join(memory_dir, "memory.events"))
        self._watches[key] = w
        if self._nursery is not None:
            self._nursery.start_soon(self._watch, w)
        else:
            self._pending.append(w)

    def _eventfd_watch(self, w: _Watch) -> None:
        """Put ``w``'s eventfd in the watcher's epoll set, made (and read) on first use."""
        if self._eventfds is None:
            self._eventfds = Readiness()
            if self._nursery is not None:
                self._nursery.start_soon(self._eventfds.run)
        try:
            assert w.fd is not None
            self._eventfds.add(w.fd, functools.partial(self._v1_ready, w), once=False)
            w.eventfds = self._eventfds
        except BaseException:
            w.close()
            raise

    def _inotify_watch(self, w: _Watch, events: str) -> None:
        """Watch ``events`` through the watcher's one inotify instance, made on first use;
        without inotify (no instance or no watch left), ``w`` polls, logged once."""
        try:
            if self._inotify is None:
                self._inotify = _Inotify()
                if self._nursery is not None:
                    self._nursery.start_soon(self._inotify.run)
            w.wd = self._inotify.add(events, w)
            w.inotify = self._inotify
        except OSError as e:  # no instance or watch left, or no inotify (ENOSYS)
            if not self._polling_logged:
                self._polling_logged = True
                log.warning("inotify unavailable (%s): polling memory.events every %gs (logged once)",
                            e, self.poll_interval)

    def remove(self, key: str) -> None:
        """Stop watching ``key`` (no-op if unknown)."""
        w = self._watches.pop(key, None)
        if w is None:
            return
        if w.scope is not None:
            w.scope.cancel()
        if w.version == 1:  # no task of its own
            w.close()
        elif w in self._pending:  # never started: nobody else will close it
            self._pending.remove(w)
            w.close()

    def __contains__(self, key: str) -> bool:
        return key in self._watches

    def check_now(self, key: str) -> None:
        """Report an OOM the kernel has signalled but the watch task has not read yet.

        The task service calls this right before publishing an exit, so that
        /tasks/oom always precedes the /tasks/exit of the process it killed.
        """
        w = self._watches.get(key)
        if w is None or w.closed:
            return
        if w.version == 1:
            self._v1_ready(w)
        else:
            self._check_v2(w)

    def _check_v2(self, w: _Watch) -> bool:
        """Fire if memory.events' oom_kill grew; False once the cgroup is gone."""
        count = read_oom_kill_count(os.path.join(w.memory_dir, "memory.events"))
        if count is None:
            return False
        if count > w.last_count:
            w.last_count = count
            self._fire(w)
        return True

    # --- per-cgroup tasks ---------------------------------------------------------

    async def _watch(self, w: _Watch) -> None:
        assert w.scope is not None  # v2 (add_cgroup)
        try:
            with w.scope:
                await self._watch_v2(w)
        except Exception:
            log.exception("OOM watch for %s failed", w.key)
        finally:
            w.close()
            if self._watches.get(w.key) is w:
                del self._watches[w.key]

    def _fire(self, w: _Watch) -> None:
        if self._watches.get(w.key) is not w:
            return
        try:
            w.on_oom(w.key)
        except Exception:
            log.exception("on_oom callback for %s failed", w.key)

    def _v1_ready(self, w: _Watch) -> None:
        """``w``'s eventfd was signalled: an OOM, or its cgroup was removed."""
        assert w.fd is not None
        try:
            os.read(w.fd, 8)
        except BlockingIOError:
            return
        except Exception:
            log.exception("OOM watch for %s failed", w.key)
        else:
            if os.path.exists(os.path.join(w.memory_dir, "memory.oom_control")):
                self._fire(w)
                return
            log.debug("memory cgroup of %s removed; stop watching", w.key)
        w.close()
        if self._watches.get(w.key) is w:
            del self._watches[w.key]

    async def _watch_v2(self, w: _Watch) -> None:
        while True:
            gone = False
            if w.inotify is not None:
                assert w.changed is not None
                with trio.move_on_after(self.recheck_interval):
                    await w.changed.wait()
                w.changed = trio.Event()
                gone = bool(w.mask & (IN_IGNORED | IN_DELETE_SELF))
                w.mask = 0
            else:
                await trio.sleep(self.poll_interval)
            if not self._check_v2(w):
                return  # cgroup removed
            if gone or _cgroup_v2_empty(w.memory_dir):
                return
