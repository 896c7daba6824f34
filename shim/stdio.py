"""A process's stdio: fifos, log files, logger binaries, and terminals.

containerd describes a process's stdio as three strings plus a terminal flag.
The stdout string picks the mode, as in the Go shim (pkg/process/io.go):

- a bare path or ``fifo://path``: the fifos ctr/CRI read and write. The
  container gets pipes; the shim copies pipe ↔ fifo.
- ``file:///path``: stdout and stderr are appended to that file (parent
  directories created 0755, file created 0644); stdin still comes from its
  fifo.
- ``binary:///path/to/logger?k=v``: a logger binary is started with fd 3 =
  stdout, fd 4 = stderr, fd 5 = a pipe it closes once ready, argv = the
  query's keys and (first) values, env = CONTAINER_ID, CONTAINER_NAMESPACE
  only. The container writes straight into the logger's pipes; stdin is not
  connected.
- anything else: "unknown STDIO scheme".

With a terminal, runc creates the pty inside the container and sends us the
master over ``console_socket``; we copy stdin fifo → master and master →
stdout (a fifo, a file, or a logger's fd 3). stderr is unused.

Holding our own pipe ends means the container never sees EPIPE when a client
detaches, and that an exit can wait until the last byte was copied out.

Fifo opening never blocks the event loop:
- output fifos are opened O_RDWR|O_NONBLOCK: Linux never blocks such an open,
  and the read side we hold keeps writes from failing while no client reads;
- the stdin fifo is opened O_RDONLY|O_NONBLOCK, then we open a writer on it
  ourselves (as the Go shim does), so a client that detaches does not end
  the container's stdin: EOF comes only once CloseIO closed our writer and
  every client writer is gone. Then a plain process sees EOF on its stdin
  pipe, and a terminal is hung up (the master is closed, like Go's
  ``epollConsole.Shutdown`` + ``Close``).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import tempfile
import termios
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from .errors import InvalidArgument, ShimError
from .runc_client.config import Stdio

log = logging.getLogger("shim.stdio")

CHUNK = 1 << 16
SPLICE_CHUNK = 1 << 20
SPLICE_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
DRAIN_POLL = 0.01
DRAIN_STALL_POLLS = 10  # no progress for this many polls: nobody is reading
#: How long start() waits for runc's connection on the console socket. runc
#: has already returned by then, so the connection is normally queued.
CONSOLE_ACCEPT_TIMEOUT = 30.0
#: After the process exited (or the terminal was hung up), how long the
#: terminal copy keeps waiting for more output before it stops.
CONSOLE_SETTLE = 0.05
#: Go's binaryIOProcTermTimeout: SIGTERM, then SIGKILL after this long.
LOGGER_TERM_TIMEOUT = 12.0

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class StdioTarget:
    """A parsed stdio string: scheme ``fifo``, ``file`` or ``binary``."""

    scheme: str
    path: str
    args: tuple[str, ...] = ()


def parse_stdio(uri: str) -> StdioTarget:
    """Parse one stdio string the way containerd's shim does.

    A string without scheme is a fifo path taken verbatim. ``binary`` args
    are the query's keys each followed by its first value (Go's
    ``NewBinaryCmd``; ``?flag`` gives ``flag ""``).
    """
    m = _SCHEME.match(uri)
    if not uri or not m:
        return StdioTarget("fifo", uri)
    scheme = m.group(1).lower()
    if scheme == "fifo":
        rest = uri[m.end() :]
        return StdioTarget("fifo", rest[2:] if rest.startswith("//") else rest)
    if scheme not in ("file", "binary"):
        raise ShimError(f"unknown STDIO scheme {scheme}")
    parts = urlsplit(uri)
    path = unquote(parts.path)
    if not path:
        raise InvalidArgument(f"stdio uri {uri!r} has no path")
    args: list[str] = []
    if scheme == "binary":
        seen: set[str] = set()
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in seen:
                seen.add(key)
                args += [key, value]
    return StdioTarget(scheme, path, tuple(args))


def fifo_path(uri: str) -> str:
    """The fifo path in a stdio string (stdin); other schemes are refused."""
    target = parse_stdio(uri)
    if target.scheme != "fifo":
        raise InvalidArgument(f"stdin must be a fifo, not {target.scheme}://")
    return target.path


def output_target(paths: StdioPaths) -> StdioTarget:
    """Where output goes: chosen by stdout (stderr when stdout is empty)."""
    return parse_stdio(paths.stdout or paths.stderr)


def _open_fifo(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"open stdio {path}: {e.strerror}") from e


class _Sink:
    """Where copied output goes; shared by stdout and stderr copies of a file."""

    def __init__(self, fd: int, kind: str) -> None:
        self.fd = fd
        self.kind = kind  # "fifo" | "file" | "pipe"
        self.users = 0
        self.broken = False


@dataclass
class _Logger:
    """A logger binary: our child, reaped by the shim's reaper like any other.

    We only ever look at it through a pidfd, which does not reap and cannot
    reach a recycled pid.
    """

    pid: int
    pidfd: int
    ready: int | None  # read end of the fd-5 pipe until the logger is ready

    def exited(self) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass


class ProcessIO:
    """One process's stdio, and the tasks copying it.

    ``id`` and ``namespace`` are given to logger binaries (CONTAINER_ID,
    CONTAINER_NAMESPACE; Go passes the exec id for exec processes); ``uid``
    and ``gid`` own the pipes handed to the container (IoUid/IoGid).
    """

    #: Path runc must be given as --console-socket (terminal processes only).
    console_socket: str | None = None

    def __init__(
        self,
        paths: StdioPaths,
        *,
        id: str = "",
        namespace: str = "",
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        self.paths = paths
        self.id = id
        self.namespace = namespace
        self.uid = uid
        self.gid = gid
        self._fds: set[int] = set()  # everything we own, closed by close()
        self._child: list[int | None] = [None, None, None]
        self._stdin_fifo: int | None = None  # read end of the stdin fifo
        self._stdin_hold: int | None = None  # our writer on it, closed by close_stdin()
        self._stdin_pipe: int | None = None  # write end of the container's stdin pipe
        self._outputs: list[tuple[int, _Sink]] = []  # (pipe read end, sink)
        self._console_sink: _Sink | None = None
        self._listener: socket.socket | None = None
        self._socket_dir: str | None = None
        self._master: int | None = None
        self._logger: _Logger | None = None
        self._nursery: trio.Nursery | None = None
        self._output_done = trio.Event()
        self._pending_outputs = 0
        self._cancel = trio.CancelScope()
        self._console_stop = False  # process exited or terminal hung up
        self._console_stop_deadline: float | None = None
        self._console_wake: trio.CancelScope | None = None
        self._console_reading = False
        self._hangup = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------

    def _own(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        return self._own(r), self._own(w)

    def _setup(self) -> None:
        if self.paths.terminal:
            target = parse_stdio(self.paths.stdout)  # stderr is unused
            self._setup_console_socket()
            self._setup_stdin_fifo()
            if target.scheme == "binary":
                out_r, out_w = self._pipe()
                err_r, err_w = self._pipe()
                self._close(err_w)  # stderr is unused with a terminal: EOF at once
                self._start_logger(target, out_r, err_r)
                os.set_blocking(out_w, False)
                self._console_sink = _Sink(out_w, "pipe")
            elif target.scheme == "file":
                self._console_sink = self._file_sink(target.path)
            elif target.path:
                self._console_sink = _Sink(self._own(_open_fifo(target.path, os.O_RDWR)), "fifo")
            return
        target = output_target(self.paths)
        if target.scheme == "binary":
            out_r, out_w = self._pipe()
            err_r, err_w = self._pipe()
            self._start_logger(target, out_r, err_r)
            self._child[1], self._child[2] = out_w, err_w
            return
        if self._setup_stdin_fifo():
            r, w = self._pipe()
            os.set_blocking(w, False)
            self._child[0] = r
            self._stdin_pipe = w
        file_sink = self._file_sink(target.path) if target.scheme == "file" else None
        for index, uri in ((1, self.paths.stdout), (2, self.paths.stderr)):
            if not uri:
                continue
            if file_sink is not None:
                sink = file_sink
            else:
                sink = _Sink(self._own(_open_fifo(parse_stdio(uri).path, os.O_RDWR)), "fifo")
            r, w = self._pipe()
            os.set_blocking(r, False)
            self._child[index] = w
            self._outputs.append((r, sink))
        if self.uid or self.gid:
            # runc.NewPipeIO: the container's ends belong to the IO user.
            for fd in self._child:
                if fd is not None:
                    os.fchown(fd, self.uid, self.gid)

    def _setup_stdin_fifo(self) -> bool:
        path = fifo_path(self.paths.stdin)
        if not path:
            return False
        self._stdin_fifo = self._own(_open_fifo(path, os.O_RDONLY))
        # Never blocks: we hold a reader. See the module doc.
        self._stdin_hold = self._own(_open_fifo(path, os.O_WRONLY))
        return True

    def _file_sink(self, path: str) -> _Sink:
        try:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ShimError(f"open log file {path}: {e.strerror}") from e
        return _Sink(self._own(fd), "file")

    def _setup_console_socket(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        if base and len(os.path.join(base, "ptyXXXXXXXX", "pty.sock")) > _SOCKET_PATH_MAX:
            base = None
        self._socket_dir = tempfile.mkdtemp(prefix="pty", dir=base)
        path = os.path.join(self._socket_dir, "pty.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener = listener
        listener.setblocking(False)
        listener.bind(path)
        listener.listen(1)
        if base:
            os.chmod(path, 0o755 | stat.S_ISVTX)  # go-runc NewTempConsoleSocket
        self.console_socket = path

    def _start_logger(self, target: StdioTarget, out_r: int, err_r: int) -> None:
        ready_r, ready_w = self._pipe()
        high: list[int] = []
        try:
            # Above 5 first, so the dup2s onto 3, 4, 5 cannot clobber each other.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (out_r, err_r, ready_w)]
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ] + [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
            env = {"CONTAINER_ID": self.id, "CONTAINER_NAMESPACE": self.namespace}
            pid = os.posix_spawn(
                target.path,
                [target.path, *target.args],
                env,
                file_actions=actions,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except OSError as e:
            raise ShimError(f"failed to start binary process {target.path}: {e.strerror}") from e
        finally:
            for fd in high:
                os.close(fd)
            # The logger holds its own copies (binaryIO.CloseAfterStart).
            for fd in (out_r, err_r, ready_w):
                self._close(fd)
        try:
            pidfd = os.pidfd_open(pid)  # no checkpoint since the spawn: not reaped yet
        except OSError:
            os.kill(pid, signal.SIGKILL)
            raise
        self._logger = _Logger(pid, pidfd, ready_r)

    # -- what runc needs ------------------------------------------------------

    def runc_stdio(self) -> Stdio:
        """The ends runc hands to the container (all None with a terminal)."""
        return Stdio(*self._child)

    def close_child_ends(self) -> None:
        """Drop our copies of the container's ends once runc has passed them on.

        Without this the output pipes never reach EOF.
        """
        for fd in self._child:
            if fd is not None:
                self._close(fd)
        self._child = [None, None, None]

    # -- running --------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Begin copying; called once runc create/exec has returned.

        With a terminal, takes the pty master runc sent to ``console_socket``
        (and removes the socket); with a logger binary, waits until it closed
        fd 5 (Go: no time limit).
        """
        self._nursery = nursery
        if self._listener is not None:
            await self._receive_master()
        if self._logger is not None and self._logger.ready is not None:
            await self._wait_logger_ready(self._logger)
        if self.paths.terminal:
            self._pending_outputs = 1
            if self._console_sink is not None:
                self._console_sink.users += 1
        else:
            self._pending_outputs = len(self._outputs)
            for _, sink in self._outputs:
                sink.users += 1
        if not self._pending_outputs:
            self._output_done.set()
        nursery.start_soon(self._run)

    async def _receive_master(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            with trio.move_on_after(CONSOLE_ACCEPT_TIMEOUT) as scope:
                while True:
                    try:
                        conn, _ = listener.accept()
                        break
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(listener)
            if scope.cancelled_caught:
                raise ShimError("failed to retrieve console master: runc never connected to the console socket")
            with conn:
                conn.setblocking(False)
                master = await _receive_fd(conn)
        finally:
            self._remove_console_socket()
        os.set_blocking(master, False)
        self._master = self._own(master)

    def _remove_console_socket(self) -> None:
        if self._listener is not None:
            _notify_closing(self._listener)
            self._listener.close()
            self._listener = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    async def _wait_logger_ready(self, logger: _Logger) -> None:
        fd = logger.ready
        assert fd is not None
        try:
            while True:
                try:
                    os.read(fd, 1)  # a byte or EOF: ready either way (as in Go)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                except OSError as e:
                    raise ShimError(f"failed to read from logging binary: {e.strerror}") from e
        finally:
            logger.ready = None
            self._close(fd)

    async def _run(self) -> None:
        with self._cancel:
            async with trio.open_nursery() as nursery:
                if self._stdin_fifo is not None:
                    dst = self._master if self.paths.terminal else self._stdin_pipe
                    nursery.start_soon(self._copy_stdin, self._stdin_fifo, dst)
                if self.paths.terminal:
                    if self._master is not None:
                        nursery.start_soon(self._copy_console, self._master, self._console_sink)
                else:
                    for src, sink in self._outputs:
                        nursery.start_soon(self._copy_output, src, sink)

    def _output_finished(self) -> None:
        self._pending_outputs -= 1
        if self._pending_outputs <= 0:
            self._output_done.set()

    async def _copy_output(self, src: int, sink: _Sink) -> None:
        try:
            if sink.kind in ("fifo", "pipe"):
                await self._splice_output(src, sink)  # returns early only if the sink broke
            while True:
                try:
                    data = self._read(src)
                except BlockingIOError:
                    await self._wait_readable(src)
                    continue
                if not data:
                    break
                await self._sink_write(sink, data)
            await self._sink_drain(sink)
        except trio.ClosedResourceError:
            pass  # close() while copying
        except OSError as e:
            log.warning("copying output stopped: %s", e)
        finally:
            self._close(src)
            self._sink_release(sink)
            self._output_finished()

    async def _splice_output(self, src: int, sink: _Sink) -> None:
        """Pipe to fifo/pipe inside the kernel (splice): no copy through Python.

        Returns at EOF, or when the sink breaks (the caller then keeps
        draining the source so the container never blocks).
        """
        while not sink.broken:
            if src not in self._fds or sink.fd not in self._fds:
                raise trio.ClosedResourceError("closed")
            try:
                n = os.splice(src, sink.fd, SPLICE_CHUNK, flags=SPLICE_FLAGS)
            except BlockingIOError:
                # Either side may be the one that would block: empty source or full sink.
                if _unread(src):
                    await trio.lowlevel.wait_writable(sink.fd)
                else:
                    await self._wait_readable(src)
                continue
            except OSError as e:
                sink.broken = True
                log.warning("output %s (%s) broken, dropping output: %s", sink.kind, self.id, e)
                return
            if n == 0:
                return

    async def _copy_console(self, master: int, sink: _Sink | None) -> None:
        """master → stdout until the last slave closed (EIO), or the process
        exited / the terminal was hung up and nothing more arrives."""
        self._console_reading = True
        try:
            while True:
                try:
                    data = self._read(master)
                except BlockingIOError:
                    if self._console_stop and not await self._console_settle(master):
                        break
                    if not self._console_stop:
                        await self._wait_console(master)
                    continue
                except OSError as e:
                    if e.errno == errno.EIO:  # every slave fd is closed
                        break
                    raise
                if not data:
                    break
                if sink is not None:
                    await self._sink_write(sink, data)
            if sink is not None:
                await self._sink_drain(sink)
        except trio.ClosedResourceError:
            pass
        except OSError as e:
            log.warning("copying terminal output stopped: %s", e)
        finally:
            self._console_reading = False
            if sink is not None:
                self._sink_release(sink)
            if self._hangup:
                self._close_master()
            self._output_finished()

    async def _wait_console(self, master: int) -> None:
        with trio.CancelScope() as scope:
            self._console_wake = scope
            try:
                await self._wait_readable(master)
            finally:
                self._console_wake = None

    async def _console_settle(self, master: int) -> bool:
        """After stop: True if more output arrived within the settle time."""
        if self._console_stop_deadline is None:
            self._console_stop_deadline = trio.current_time() + CONSOLE_SETTLE
        with trio.move_on_at(self._console_stop_deadline):
            await self._wait_readable(master)
            return True
        return False

    def _stop_console(self) -> None:
        self._console_stop = True
        if self._console_wake is not None:
            self._console_wake.cancel()

    async def _copy_stdin(self, fifo: int, dst: int | None) -> None:
        try:
            while dst is not None:
                await self._wait_readable(fifo)
                try:
                    data = self._read(fifo)
                except BlockingIOError:
                    continue
                if not data:
                    break
                await self._write_all(dst, data)
        except trio.ClosedResourceError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                log.warning("copying stdin stopped: %s", e)
        finally:
            self._close(fifo)
            self._stdin_fifo = None
            if self.paths.terminal:
                self._hang_up()
            elif self._stdin_pipe is not None:
                self._close(self._stdin_pipe)
                self._stdin_pipe = None

    def _hang_up(self) -> None:
        """stdin is over for a terminal: as Go, shut the console down and close it."""
        if self._master is None or self._hangup:
            return
        self._hangup = True
        self._stop_console()
        if not self._console_reading:
            self._close_master()

    def _close_master(self) -> None:
        if self._master is not None:
            self._close(self._master)
            self._master = None

    # -- sinks ----------------------------------------------------------------

    async def _sink_write(self, sink: _Sink, data: bytes) -> None:
        if sink.broken:
            return
        try:
            await self._write_all(sink.fd, data)
        except OSError as e:
            # Keep draining the source, so the container does not block on a
            # full pipe or terminal; what it writes from now on is dropped.
            sink.broken = True
            log.warning("output %s (%s) broken, dropping output: %s", sink.kind, self.id, e)

    async def _sink_drain(self, sink: _Sink) -> None:
        """The last writer of a fifo gives its reader time to take the rest."""
        if sink.users == 1 and sink.kind == "fifo" and sink.fd in self._fds and not sink.broken:
            await _wait_drained(sink.fd, lambda: sink.fd in self._fds)

    def _sink_release(self, sink: _Sink) -> None:
        sink.users -= 1
        if sink.users <= 0:
            self._close(sink.fd)

    async def _wait_readable(self, fd: int) -> None:
        if fd not in self._fds:
            raise trio.ClosedResourceError("closed")
        await trio.lowlevel.wait_readable(fd)

    def _read(self, fd: int) -> bytes:
        if fd not in self._fds:
            raise trio.ClosedResourceError("closed")
        return os.read(fd, CHUNK)

    async def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if fd not in self._fds:
                raise trio.ClosedResourceError("closed")
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                if fd not in self._fds:
                    raise trio.ClosedResourceError("closed") from None
                await trio.lowlevel.wait_writable(fd)
                continue
            view = view[n:]

    # -- RPCs -----------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        """ResizePty: set the terminal's window size.

        Like the Go shim, a no-op for a process without a terminal (or before
        or after its master is held).
        """
        if self._master is None:
            return
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        """CloseIO: close our writer on the stdin fifo.

        The container sees EOF (a terminal is hung up) once every client
        writer is gone too and what they wrote was copied.
        """
        if self._stdin_hold is not None:
            self._close(self._stdin_hold)
            self._stdin_hold = None

    async def wait_output(self, timeout: float) -> bool:
        """The process exited: wait until its output is copied out.

        False on timeout. For a terminal, copying stops at EOF (every slave
        closed) or as soon as no more output arrives (Go shuts the console
        down at exit).
        """
        if self.paths.terminal:
            self._stop_console()
        with trio.move_on_after(timeout):
            await self._output_done.wait()
            return True
        return False

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            _notify_closing(fd)
            os.close(fd)

    def close(self) -> None:
        """Stop copying, release every fd, stop the logger binary."""
        self._cancel.cancel()
        self._remove_console_socket()
        self._master = None
        for fd in list(self._fds):
            self._close(fd)
        self._stdin_hold = self._stdin_fifo = self._stdin_pipe = None
        self._stop_logger()

    def _stop_logger(self) -> None:
        """Go's binaryIO.Close: pipes closed, SIGTERM, SIGKILL after 12s."""
        logger, self._logger = self._logger, None
        if logger is None:
            return
        if not logger.exited():
            logger.signal(signal.SIGTERM)
            if self._nursery is not None:
                try:
                    self._nursery.start_soon(_stop_logger_later, logger)
                    return
                except RuntimeError:
                    pass  # the shim is shutting down
            logger.signal(signal.SIGKILL)
        os.close(logger.pidfd)


async def _stop_logger_later(logger: _Logger) -> None:
    try:
        with trio.move_on_after(LOGGER_TERM_TIMEOUT):
            await trio.lowlevel.wait_readable(logger.pidfd)
            return
        log.warning("logger binary %d still running %.0fs after SIGTERM, killing it", logger.pid, LOGGER_TERM_TIMEOUT)
        logger.signal(signal.SIGKILL)
    finally:
        _notify_closing(logger.pidfd)
        os.close(logger.pidfd)


async def _receive_fd(conn: socket.socket) -> int:
    """The one fd runc sends with the pty's name as payload (go-runc recvFd)."""
    while True:
        try:
            msg, ancdata, flags, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
            break
        except BlockingIOError:
            await trio.lowlevel.wait_readable(conn)
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ShimError(f"failed to retrieve console master: got {len(fds)} fds (payload {msg!r})")
    return fds[0]


def _notify_closing(fd) -> None:
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


async def _wait_drained(fifo: int, alive=lambda: True) -> None:
    """Give a reading client the chance to take the fifo's last bytes.

    Clients such as ctr stop reading as soon as they learn of the exit, so
    the exit is held until the fifo is empty, as long as someone is visibly
    draining it; with no reader (a detached client) we stop after a short stall.
    """
    last = _unread(fifo)
    stalled = 0
    while last and stalled < DRAIN_STALL_POLLS:
        await trio.sleep(DRAIN_POLL)
        if not alive():
            return
        now = _unread(fifo)
        stalled = stalled + 1 if now >= last else 0
        last = now
