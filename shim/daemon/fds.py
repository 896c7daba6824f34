"""The fds a process's stdio owns, and the sinks its output is copied into.

Copy tasks wait on fds that ``ProcessIO.close()`` may close at any moment.
Every fd is therefore closed through ``OwnedFds``, which first wakes the
tasks waiting on it; and every read, write or wait checks the fd is still
owned, so a copy stops with ``trio.ClosedResourceError`` instead of touching
a number the kernel may already have handed out again.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import select
import termios

import trio

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import socket
    from collections.abc import Callable

log = logging.getLogger("shim.stdio")

CHUNK = 1 << 16
DRAIN_POLL = 0.01
DRAIN_STALL_POLLS = 10  # no progress for this many polls: nobody is reading


class OwnedFds:
    """Every fd one process's stdio owns, all closed by ``close_all()``."""

    def __init__(self) -> None:
        self._fds: set[int] = set()

    def __contains__(self, fd: int) -> bool:
        return fd in self._fds

    def own(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        return self.own(r), self.own(w)

    def close(self, fd: int) -> None:
        """Close fd if we still own it (a second close is a no-op)."""
        if fd in self._fds:
            self._fds.discard(fd)
            notify_closing(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self._fds):
            self.close(fd)

    def _check(self, fd: int) -> None:
        if fd not in self._fds:
            raise trio.ClosedResourceError("closed")

    async def wait_readable(self, fd: int) -> None:
        self._check(fd)
        await trio.lowlevel.wait_readable(fd)

    def read(self, fd: int) -> bytes:
        self._check(fd)
        return os.read(fd, CHUNK)

    async def write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check(fd)
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                if fd not in self._fds:
                    raise trio.ClosedResourceError("closed") from None
                await trio.lowlevel.wait_writable(fd)
                continue
            view = view[n:]


class Sink:
    """Where copied output goes; shared by stdout and stderr copies of a file.

    ``id`` names the process in log messages.
    """

    def __init__(self, fds: OwnedFds, fd: int, kind: str, id: str) -> None:
        self.fds = fds
        self.fd = fds.own(fd)
        self.kind = kind  # "fifo" | "file" | "pipe"
        self.id = id
        self.users = 0
        self.broken = False
        #: Bytes written so far: how ProcessIO tells moving output from output nobody takes.
        self.written = 0

    def mark_broken(self, error: OSError) -> None:
        """Give up on this sink; what is written to it from now on is dropped."""
        self.broken = True
        log.warning("output %s (%s) broken, dropping output: %s", self.kind, self.id, error)

    async def write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            if self.kind == "file":
                # A regular file never says EAGAIN: a slow disk would block the loop, and every
                # other container of this shim with it. Its writes go through a worker thread.
                await trio.to_thread.run_sync(write_all_blocking, self.fd, data)
            else:
                await self.fds.write_all(self.fd, data)
            self.written += len(data)
        except OSError as e:
            # Keep draining the source, so the container does not block on a
            # full pipe or terminal.
            self.mark_broken(e)

    async def drain(self) -> None:
        """The last writer of a fifo gives its reader time to take the rest."""
        if self.users == 1 and self.kind == "fifo" and self.fd in self.fds and not self.broken:
            await wait_drained(self.fd, lambda: self.fd in self.fds)

    def unread(self) -> int:
        """Bytes written to a fifo that its reader has not taken yet (0 for other sinks)."""
        if self.kind != "fifo" or self.broken or self.fd not in self.fds:
            return 0
        try:
            return unread(self.fd)
        except OSError:
            return 0

    def release(self) -> None:
        """One copy is done with the sink; the last one closes it."""
        self.users -= 1
        if self.users <= 0:
            self.fds.close(self.fd)


def write_all_blocking(fd: int, data: bytes) -> None:
    """Write all of data to a blocking fd (a worker thread's, or a file the caller owns)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Readiness:
    """One epoll set, read by one task: a callback per fd when it turns readable (or hangs up).

    A trio task blocked on an fd costs ~3 KiB (task, coroutine frames, cancel status); a
    shim serving a namespace has three stdio copiers and an OOM eventfd per task, nearly all
    idle. Callbacks run in the reading task: they must not block; an exception is logged.
    ``once``: the fd is taken out when it fires (a parked copier, resumed as a task).
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, tuple[Callable[[], None], bool]] = {}

    def add(self, fd: int, callback: Callable[[], None], *, once: bool) -> None:
        """Raises OSError if ``fd`` cannot be watched (e.g. a regular file)."""
        self._epoll.register(fd, select.EPOLLIN | (select.EPOLLONESHOT if once else 0))
        self._callbacks[fd] = (callback, once)

    def remove(self, fd: int) -> Callable[[], None] | None:
        """Take ``fd`` out (before it is closed: its number may be reused); its callback."""
        entry = self._callbacks.pop(fd, None)
        if entry is None:
            return None
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # ValueError: closed with its run (the trio run ended)
            pass
        return entry[0]

    def __len__(self) -> int:
        return len(self._callbacks)

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    entry = self._callbacks.get(fd)
                    if entry is None:
                        continue
                    if entry[1]:
                        self.remove(fd)
                    call_guarded(entry[0])
        finally:
            self.close()

    def close(self) -> None:
        self._epoll.close()


def call_guarded(callback: Callable[[], None]) -> None:
    """A callback's bug is logged: this runs in a system task (or the reaper), whose
    exception would end the whole shim and every container it serves."""
    try:
        callback()
    except Exception:
        log.exception("shim: callback %r failed", callback)


_PARKING: trio.lowlevel.RunVar[Readiness] = trio.lowlevel.RunVar("shim_parking")


def parking() -> Readiness:
    """Where this trio run's idle stdio copiers wait (``once``), read by a system task
    started on first use."""
    try:
        return _PARKING.get()
    except LookupError:
        p = Readiness()
        trio.lowlevel.spawn_system_task(p.run, name="stdio parking")
        _PARKING.set(p)
        return p


def notify_closing(fd: int | socket.socket) -> None:
    """Wake any task waiting on fd before it is closed (no-op outside trio)."""
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass


def unread(fd: int) -> int:
    """Bytes still sitting in the pipe/fifo buffer behind fd."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


#: What a pipe holds by default (16 pages), and what a pipe that output keeps full is grown to.
PIPE_SIZE = 1 << 16
BUSY_PIPE_SIZE = 1 << 20  # fs.pipe-max-size's default: the most an unprivileged shim may ask for


def grow_pipe(fd: int, size: int = BUSY_PIPE_SIZE) -> None:
    """Give a pipe or fifo room for ``size`` bytes (F_SETPIPE_SZ), when the kernel lets us.

    For output that fills the 64 KiB default: the container and the shim, or the shim and the
    client reading the fifo, otherwise take turns every 64 KiB, each waking the other. A
    bigger pipe costs its ring (256 slots of 40 bytes for 1 MiB: ~10 KiB of kernel memory) and, until it is shrunk
    again (``shrink_pipe``), 256 pages of its user's pipe quota instead of 16
    (fs.pipe-user-pages-soft: past it, that user's unprivileged processes, containers running
    as root among them, get 2-page pipes). The data's pages stay charged to the container
    that wrote them (splice moves them). Refused (EPERM over fs.pipe-max-size or the user's
    quota) is fine: the pipe keeps its size."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        pass


def shrink_pipe(fd: int) -> bool:
    """Give a grown pipe its default size back; False while it holds more than that (EBUSY)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        return False
    return True


def hung_up(fd: int) -> bool:
    """A pipe's read end whose writers are all gone (POLLHUP), without reading from it."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


async def wait_drained(fifo: int, alive: Callable[[], bool] = lambda: True) -> None:
    """Give a reading client the chance to take the fifo's last bytes.

    Clients such as ctr stop reading as soon as they learn of the exit, so
    the exit is held until the fifo is empty, as long as someone is visibly
    draining it; with no reader (a detached client) we stop after a short stall.
    """
    last = unread(fifo)
    stalled = 0
    while last and stalled < DRAIN_STALL_POLLS:
        await trio.sleep(DRAIN_POLL)
        if not alive():
            return
        now = unread(fifo)
        stalled = stalled + 1 if now >= last else 0
        last = now
