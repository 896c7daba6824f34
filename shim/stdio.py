"""Copying a process's stdio between runc's pipes and containerd's fifos.

containerd (ctr, CRI) gives each process up to three fifo paths. The
container gets the write end of a pipe for stdout/stderr (and the read end of
one for stdin); the shim copies between those pipes and the fifos. Holding our
own pipe ends means the container never sees EPIPE when a client detaches,
and that an exit can wait until the last byte was copied out.

Fifo opening never blocks the event loop:
- output fifos are opened O_RDWR|O_NONBLOCK: Linux never blocks such an open,
  and the read side we hold keeps writes from failing while no client reads;
- the stdin fifo is opened O_RDONLY|O_NONBLOCK and read only after epoll says
  readable: on a fifo, epoll reports HUP only once a writer has come and gone,
  so EOF means the client closed stdin, not that it has not opened it yet.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import termios
from dataclasses import dataclass

import trio

from .errors import FailedPrecondition, InvalidArgument, Unimplemented
from .runc_client.config import Stdio

log = logging.getLogger("shim.stdio")

CHUNK = 1 << 16
DRAIN_POLL = 0.01
DRAIN_STALL_POLLS = 10  # no progress for this many polls: nobody is reading


@dataclass(frozen=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


def fifo_path(uri: str) -> str:
    """The fifo path in a stdio string; other URI schemes are refused."""
    if not uri:
        return ""
    if uri.startswith("fifo://"):
        return uri[len("fifo://") :]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise Unimplemented(f"stdio scheme {scheme}:// is not supported yet")
    return uri


def _open_fifo(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"open stdio {path}: {e.strerror}") from e


class ProcessIO:
    """One process's pipes and fifos, and the tasks copying between them."""

    def __init__(self, paths: StdioPaths) -> None:
        if paths.terminal:
            raise Unimplemented("terminal (tty) processes are not supported yet")
        self.paths = paths
        self._fds: list[int] = []  # everything we own, closed by close()
        self._child: list[int | None] = [None, None, None]
        self._stdin: tuple[int, int] | None = None  # (fifo, pipe write end)
        self._outputs: list[tuple[int, int]] = []  # (pipe read end, fifo)
        self._stdin_w: int | None = None
        self._output_done = trio.Event()
        self._pending_outputs = 0
        self._cancel = trio.CancelScope()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _setup(self) -> None:
        stdin = fifo_path(self.paths.stdin)
        if stdin:
            fifo = self._own(_open_fifo(stdin, os.O_RDONLY))
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self._own(w), False)
            self._child[0] = self._own(r)
            self._stdin = (fifo, w)
            self._stdin_w = w
        for index, uri in ((1, self.paths.stdout), (2, self.paths.stderr)):
            path = fifo_path(uri)
            if not path:
                continue
            fifo = self._own(_open_fifo(path, os.O_RDWR))
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self._own(r), False)
            self._child[index] = self._own(w)
            self._outputs.append((r, fifo))
        self._pending_outputs = len(self._outputs)
        if not self._pending_outputs:
            self._output_done.set()

    def runc_stdio(self) -> Stdio:
        """The ends runc hands to the container."""
        return Stdio(*self._child)

    def close_child_ends(self) -> None:
        """Drop our copies of the container's ends once runc has passed them on.

        Without this the output pipes never reach EOF.
        """
        for fd in self._child:
            if fd is not None:
                self._close(fd)
        self._child = [None, None, None]

    #: Path runc must be given as --console-socket (terminal processes only).
    console_socket: str | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Begin copying; called once runc create/exec has returned."""
        nursery.start_soon(self._run)

    def resize(self, width: int, height: int) -> None:
        """ResizePty: only terminal processes have a window size."""
        raise FailedPrecondition("process has no terminal")

    async def _run(self) -> None:
        with self._cancel:
            async with trio.open_nursery() as nursery:
                if self._stdin is not None:
                    nursery.start_soon(self._copy_stdin, *self._stdin)
                for src, dst in self._outputs:
                    nursery.start_soon(self._copy_output, src, dst)

    async def _copy_output(self, src: int, dst: int) -> None:
        try:
            while True:
                try:
                    data = os.read(src, CHUNK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(src)
                    continue
                if not data:
                    break
                await _write_all(dst, data)
            await _wait_drained(dst)
        except trio.ClosedResourceError:
            pass  # close() while copying
        except OSError as e:
            log.warning("copying output stopped: %s", e)
        finally:
            self._close(src)
            self._close(dst)
            self._pending_outputs -= 1
            if not self._pending_outputs:
                self._output_done.set()

    async def _copy_stdin(self, fifo: int, pipe_w: int) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(fifo)
                try:
                    data = os.read(fifo, CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    break
                await _write_all(pipe_w, data)
        except trio.ClosedResourceError:
            pass
        except OSError as e:
            if e.errno != errno.EPIPE:
                log.warning("copying stdin stopped: %s", e)
        finally:
            self._close(fifo)
            self.close_stdin()

    def close_stdin(self) -> None:
        """CloseIO: the process sees EOF on stdin."""
        if self._stdin_w is not None:
            self._close(self._stdin_w)
            self._stdin_w = None

    async def wait_output(self, timeout: float) -> bool:
        """Wait until stdout/stderr are copied out (pipes at EOF); False on timeout."""
        with trio.move_on_after(timeout):
            await self._output_done.wait()
            return True
        return False

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            _notify_closing(fd)
            os.close(fd)

    def close(self) -> None:
        """Stop copying and release every fd."""
        self._cancel.cancel()
        for fd in list(self._fds):
            self._close(fd)


def _notify_closing(fd: int) -> None:
    """Wake any task waiting on fd before it is closed (no-op outside trio)."""
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass


def _unread(fd: int) -> int:
    """Bytes still sitting in the pipe/fifo buffer behind fd."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


async def _wait_drained(fifo: int) -> None:
    """Give a reading client the chance to take the fifo's last bytes.

    Clients such as ctr stop reading as soon as they learn of the exit, so
    the exit is held until the fifo is empty, as long as someone is visibly
    draining it; with no reader (a detached client) we stop after a short stall.
    """
    last = _unread(fifo)
    stalled = 0
    while last and stalled < DRAIN_STALL_POLLS:
        await trio.sleep(DRAIN_POLL)
        now = _unread(fifo)
        stalled = stalled + 1 if now >= last else 0
        last = now


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[n:]

