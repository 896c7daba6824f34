"""A process's stdio: fifos, log files, logger binaries, and terminals.

containerd describes a process's stdio as three strings plus a terminal flag.
The stdout string picks the mode, as in the Go shim (pkg/process/io.go):

- a bare path or ``fifo://path``: the fifos ctr/CRI read and write. The
  container gets pipes; the shim copies pipe ↔ fifo.
- ``file:///path``: stdout and stderr are appended to that file (parent
  directories created 0755, file created 0644); stdin still comes from its
  fifo.
- ``binary:///path/to/logger?k=v``: a logger binary gets the container's
  output (see ``shim.daemon.logger``); stdin is not connected.
- anything else: "unknown STDIO scheme".

With a terminal, runc sends us the pty master and the shim copies it to and
from the fifos (see ``shim.daemon.console``).

Holding our own pipe ends means the container never sees EPIPE when a client
detaches, and that an exit can wait until the last byte was copied out.

Fifo opening never blocks the event loop:
- output fifos are opened O_RDWR|O_NONBLOCK: Linux never blocks such an open,
  and the read side we hold keeps writes from failing while no client reads;
- the stdin fifo is opened O_RDONLY|O_NONBLOCK, then we open a writer on it
  ourselves (as the Go shim does), so a client that detaches does not end
  the container's stdin: EOF comes only once CloseIO closed our writer and
  every client writer is gone. Then a plain process sees EOF on its stdin
  pipe, and a terminal is hung up.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from shim.common.errors import InvalidArgument, ResourceExhausted, ShimError
from shim.common.nofile import exhausted
from shim.runc_client.config import Stdio

from .console import Console
from .fds import DRAIN_POLL, PIPE_SIZE, OwnedFds, Sink, grow_pipe, hung_up, parking, shrink_pipe, unread
from .isolation import Spawner
from .logger import Logger, start_logger

log = logging.getLogger("shim.stdio")

SPLICE_CHUNK = 1 << 20
SPLICE_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


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
        return StdioTarget("fifo", rest.removeprefix("//"))
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
        if exhausted(e):  # the shim's fds, not the caller's path
            raise ResourceExhausted(f"open stdio {path}: {e.strerror}") from e
        raise InvalidArgument(f"open stdio {path}: {e.strerror}") from e


#: How long output may stand still after an exit before nobody is taken to be reading it.
OUTPUT_STALL = 0.15
#: How long a copy with nothing to read keeps its task before it parks (see _readable_soon).
PARK_AFTER = 1.0


def _splice(src: int, dst: int) -> int | None:
    """Bytes spliced, None if either side would block. Not inline in the copier: an
    exception caught around an ``await`` stays alive (with its traceback) for as long as the
    task waits there, ~0.5 KiB per idle copier."""
    try:
        return os.splice(src, dst, SPLICE_CHUNK, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return None


async def _scoped(scopes: set[trio.CancelScope], scope: trio.CancelScope, fn: Callable[..., Awaitable[None]],
                  *args: Any) -> None:
    try:
        with scope:
            await fn(*args)
    finally:
        scopes.discard(scope)


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


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
        self._fds = OwnedFds()  # everything we own, closed by close()
        self._child: list[int | None] = [None, None, None]
        self._stdin_fifo: int | None = None  # read end of the stdin fifo
        self._stdin_hold: int | None = None  # our writer on it, closed by close_stdin()
        self._stdin_pipe: int | None = None  # write end of the container's stdin pipe
        self._outputs: list[tuple[int, Sink]] = []  # (pipe read end, sink)
        self._console: Console | None = None  # terminal processes only
        self._logger: Logger | None = None
        self._nursery: Spawner | None = None
        self._output_done = trio.Event()
        self._pending_outputs = 0
        #: One per copier, all cancelled by close(): copiers are the container's own tasks
        #: (no task and nursery of ProcessIO's above them: ~4 KiB a container in a namespace shim).
        self._copiers: set[trio.CancelScope] = set()
        self._parked: set[int] = set()  # fds whose copy waits in fds.parking()
        self._grown: set[int] = set()  # pipes and fifos grown since output filled them (fds.grow_pipe)
        self._closed = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------

    def _setup(self) -> None:
        if self.paths.terminal:
            self._setup_terminal()
            return
        target = output_target(self.paths)
        if target.scheme == "binary":
            out_r, out_w = self._fds.pipe()
            err_r, err_w = self._fds.pipe()
            self._start_logger(target, out_r, err_r)
            self._child[1], self._child[2] = out_w, err_w
            return
        if self._setup_stdin_fifo():
            r, w = self._fds.pipe()
            os.set_blocking(w, False)
            self._child[0] = r
            self._stdin_pipe = w
        file_sink = self._file_sink(target.path) if target.scheme == "file" else None
        for index, uri in ((1, self.paths.stdout), (2, self.paths.stderr)):
            if not uri:
                continue
            sink = file_sink if file_sink is not None else self._fifo_sink(parse_stdio(uri).path)
            r, w = self._fds.pipe()
            os.set_blocking(r, False)
            self._child[index] = w
            self._outputs.append((r, sink))
        if self.uid or self.gid:
            # runc.NewPipeIO: the container's ends belong to the IO user.
            for fd in self._child:
                if fd is not None:
                    os.fchown(fd, self.uid, self.gid)

    def _setup_terminal(self) -> None:
        """The console socket, stdin, and where the terminal's output goes."""
        target = parse_stdio(self.paths.stdout)  # stderr is unused
        console = self._console = Console(self._fds)
        self.console_socket = console.socket_path
        self._setup_stdin_fifo()
        if target.scheme == "binary":
            out_r, out_w = self._fds.pipe()
            err_r, err_w = self._fds.pipe()
            self._fds.close(err_w)  # stderr is unused with a terminal: EOF at once
            self._start_logger(target, out_r, err_r)
            os.set_blocking(out_w, False)
            console.sink = self._sink(out_w, "pipe")
        elif target.scheme == "file":
            console.sink = self._file_sink(target.path)
        elif target.path:
            console.sink = self._fifo_sink(target.path)

    def _setup_stdin_fifo(self) -> bool:
        path = fifo_path(self.paths.stdin)
        if not path:
            return False
        self._stdin_fifo = self._fds.own(_open_fifo(path, os.O_RDONLY))
        # Never blocks: we hold a reader. See the module doc.
        self._stdin_hold = self._fds.own(_open_fifo(path, os.O_WRONLY))
        return True

    def _sink(self, fd: int, kind: str) -> Sink:
        return Sink(self._fds, fd, kind, self.id)

    def _fifo_sink(self, path: str) -> Sink:
        fd = _open_fifo(path, os.O_RDWR)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # A plain path naming an existing regular file: append, as the Go shim
            # does; never overwrite what is there.
            os.close(fd)
            return self._sink(_open_fifo(path, os.O_WRONLY | os.O_APPEND), "file")
        return self._sink(fd, "fifo")

    def _file_sink(self, path: str) -> Sink:
        try:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ShimError(f"open log file {path}: {e.strerror}") from e
        return self._sink(fd, "file")

    def _start_logger(self, target: StdioTarget, out_r: int, err_r: int) -> None:
        self._logger = start_logger(
            self._fds, target.path, target.args, out_r, err_r, id=self.id, namespace=self.namespace
        )

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
                self._fds.close(fd)
        self._child = [None, None, None]

    # -- running --------------------------------------------------------------

    async def start(self, nursery: Spawner) -> None:
        """Begin copying; called once runc create/exec has returned.

        With a terminal, takes the pty master runc sent to ``console_socket``
        (and removes the socket); with a logger binary, waits until it closed
        fd 5 (Go: no time limit).
        """
        self._nursery = nursery
        if self._console is not None and self._console.awaiting_master:
            await self._console.receive_master()
        if self._logger is not None and self._logger.ready is not None:
            await self._logger.wait_ready(self._fds)
        if self._console is not None:
            self._pending_outputs = 1
            if self._console.sink is not None:
                self._console.sink.users += 1
        else:
            self._pending_outputs = len(self._outputs)
            for _, sink in self._outputs:
                sink.users += 1
        if not self._pending_outputs:
            self._output_done.set()
        console = self._console
        if self._stdin_fifo is not None:
            dst = console.master if console is not None else self._stdin_pipe
            self._copier(self._copy_stdin, self._stdin_fifo, dst)
        if console is not None:
            if console.master is not None:
                self._copier(self._copy_console, console, console.master)
        else:
            for src, sink in self._outputs:
                self._copier(self._copy_output, src, sink)

    def _copier(self, copy: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start (or resume) one copy in the spawner given to start(), cancelled by close()."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        if self._closed:
            scope.cancel()
        self._copiers.add(scope)
        self._nursery.start_soon(_scoped, self._copiers, scope, copy, *args)

    def _park(self, fd: int, copy: Callable[..., Awaitable[None]], *args: Any) -> None:
        """``fd`` has nothing to read: run ``copy(*args)`` again once it has (or hangs up),
        with no task waiting meanwhile (shim.daemon.fds.parking)."""
        try:
            parking().add(fd, lambda: self._resume(fd, copy, args), once=True)
        except OSError:  # not pollable by epoll: wait in a task after all
            self._copier(self._when_readable, fd, copy, args)
            return
        self._parked.add(fd)

    def _resume(self, fd: int, copy: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        self._parked.discard(fd)
        try:
            self._copier(copy, *args)
        except RuntimeError:  # the spawner's nursery is closed: the shim is going away
            log.debug("%s: output copy not resumed: shutting down", self.id)

    def _resume_parked(self) -> None:
        """close(): resumed copies find their fds closed and finish (output done)."""
        if not self._parked:
            return
        try:
            spot = parking()
        except RuntimeError:  # outside the trio run (it ended): nothing is left to resume
            self._parked.clear()
            return
        for fd in list(self._parked):
            resume = spot.remove(fd)
            if resume is not None:
                resume()

    async def _readable_soon(self, fd: int) -> bool:
        """Whether ``fd`` turns readable within PARK_AFTER. A copy keeps its task while its
        stream is busy (a log line every few ms would otherwise pay a park, a wake-up and a
        new task per line) and parks only once it has been idle that long."""
        with trio.move_on_after(PARK_AFTER):
            await self._fds.wait_readable(fd)
            return True
        return False

    async def _when_readable(self, fd: int, copy: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        with contextlib.suppress(trio.ClosedResourceError):  # the copy then finds it closed
            await self._fds.wait_readable(fd)
        await copy(*args)

    def _output_finished(self) -> None:
        self._pending_outputs -= 1
        if self._pending_outputs <= 0:
            self._output_done.set()

    async def _copy_console(self, console: Console, master: int) -> None:
        try:
            await console.copy(master)
        finally:
            self._output_finished()

    async def _copy_output(self, src: int, sink: Sink) -> None:
        """Copy until ``src`` is empty (then park) or at its end (then finish)."""
        done = True
        try:
            done = await self._output_until_idle(src, sink)
            while not done and await self._readable_soon(src):
                done = await self._output_until_idle(src, sink)
        except trio.ClosedResourceError:
            done = True  # close() while copying
        except OSError as e:
            done = True
            log.warning("copying output stopped: %s", e)
        finally:
            if done:
                self._fds.close(src)
                sink.release()
                self._output_finished()
            else:
                self._shrink(src, sink.fd)
                self._park(src, self._copy_output, src, sink)

    async def _output_until_idle(self, src: int, sink: Sink) -> bool:
        """True at EOF, False once ``src`` has nothing more for now."""
        if sink.kind in ("fifo", "pipe") and not await self._splice_output(src, sink):
            return False
        while True:  # a file sink, a broken sink (drained to nowhere), or EOF seen by splice
            data = self._read(src)
            if data is None:
                return False
            if not data:
                break
            await sink.write(data)
        await sink.drain()
        return True

    async def _splice_output(self, src: int, sink: Sink) -> bool:
        """Pipe to fifo/pipe inside the kernel (splice): no copy through Python.

        True at EOF, or when the sink breaks (the caller then keeps draining the
        source so the container never blocks); False once ``src`` is empty for now.
        A pipe seen full, the container's (one splice took all it holds by default) or the
        sink (it takes nothing while the container's pipe has data), is grown once
        (fds.grow_pipe) and shrunk again when the copy parks (_shrink): only output that
        keeps them full holds the room, and only while it flows.
        """
        while not sink.broken:
            if src not in self._fds or sink.fd not in self._fds:
                raise trio.ClosedResourceError("closed")
            try:
                n = _splice(src, sink.fd)
            except OSError as e:
                sink.mark_broken(e)
                return True
            if n is None:
                # Either side may be the one that would block: empty source or full sink.
                if unread(src):
                    if self._grow_once(sink.fd):
                        continue
                    await trio.lowlevel.wait_writable(sink.fd)
                    continue
                # empty: at its end if no writer is left (splice says EAGAIN while the sink is full)
                return hung_up(src)
            if n == 0:
                return True
            sink.written += n
            if n >= PIPE_SIZE:
                self._grow_once(src)
        return True

    def _grow_once(self, fd: int) -> bool:
        """Grow a pipe output filled (see _splice_output); False if it was already."""
        if fd in self._grown:
            return False
        self._grown.add(fd)
        grow_pipe(fd)
        return True

    def _shrink(self, *fds: int) -> None:
        """The stream has been idle PARK_AFTER (its copy parks): give back the room grown for
        it, which counts against the user's pipe quota (fds.grow_pipe), so only streams busy
        now hold it. A fifo still holding more than the default keeps it until the next park."""
        for fd in fds:
            if fd in self._grown and shrink_pipe(fd):
                self._grown.discard(fd)

    def _read(self, fd: int) -> bytes | None:
        """What ``fd`` has, None if nothing yet (see _splice)."""
        try:
            return self._fds.read(fd)
        except BlockingIOError:
            return None

    async def _copy_stdin(self, fifo: int, dst: int | None) -> None:
        """Copy until the fifo is empty (then park) or at its end (then finish)."""
        done = True
        try:
            done = await self._stdin_until_idle(fifo, dst)
            while not done and await self._readable_soon(fifo):
                done = await self._stdin_until_idle(fifo, dst)
        except trio.ClosedResourceError:
            done = True
        except OSError as e:
            done = True
            if e.errno not in (errno.EPIPE, errno.EIO):
                log.warning("copying stdin stopped: %s", e)
        finally:
            if not done:
                self._park(fifo, self._copy_stdin, fifo, dst)
            else:
                self._stdin_finished(fifo)

    async def _stdin_until_idle(self, fifo: int, dst: int | None) -> bool:
        while dst is not None:
            data = self._read(fifo)
            if data is None:
                return False
            if not data:
                break
            await self._fds.write_all(dst, data)
        return True

    def _stdin_finished(self, fifo: int) -> None:
        self._fds.close(fifo)
        self._stdin_fifo = None
        if self._console is not None:
            self._console.hang_up()
        elif self._stdin_pipe is not None:
            self._fds.close(self._stdin_pipe)
            self._stdin_pipe = None

    # -- RPCs -----------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        """ResizePty: set the terminal's window size.

        Like the Go shim, a no-op for a process without a terminal (or before
        or after its master is held).
        """
        if self._console is not None:
            self._console.resize(width, height)

    def close_stdin(self) -> None:
        """CloseIO: close our writer on the stdin fifo.

        The container sees EOF (a terminal is hung up) once every client
        writer is gone too and what they wrote was copied.
        """
        if self._stdin_hold is not None:
            self._fds.close(self._stdin_hold)
            self._stdin_hold = None

    async def wait_output(self, timeout: float) -> bool:
        """The process exited: wait until its output is copied out.

        False on timeout. For a terminal, copying stops at EOF (every slave
        closed) or as soon as no more output arrives (Go shuts the console
        down at exit).
        """
        if self._console is not None:
            self._console.stop()
        if self._output_done.is_set():
            # The usual case for a short process (the copiers saw EOF before its exit was
            # handled): no nursery and no two tasks on the way to its exit event and Wait.
            return True
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_after, self._output_done.wait, nursery.cancel_scope)
                nursery.start_soon(_cancel_after, self._until_output_stalls, nursery.cancel_scope)
        return self._output_done.is_set()

    def _sinks(self) -> list[Sink]:
        sinks = {id(sink): sink for _, sink in self._outputs}
        if self._console is not None and self._console.sink is not None:
            sinks[id(self._console.sink)] = self._console.sink
        return list(sinks.values())

    async def _until_output_stalls(self) -> None:
        """Return once no output has moved for OUTPUT_STALL seconds.

        Moving: bytes written to a sink, or a fifo's reader taking bytes. A
        client that is there keeps it moving, so it gets the whole tail; with
        nobody reading (``ctr run -d``, a detached client, a stuck logger) or
        nothing more coming (a grandchild holding the pipe), the exit goes
        out at once instead of after the full timeout.
        """
        sinks = self._sinks()

        def snapshot() -> list[tuple[int, int]]:
            return [(sink.written, sink.unread()) for sink in sinks]

        last, quiet = snapshot(), 0.0
        while quiet < OUTPUT_STALL:
            await trio.sleep(DRAIN_POLL)
            now = snapshot()
            moved = any(w1 > w0 or u1 < u0 for (w0, u0), (w1, u1) in zip(last, now, strict=True))
            quiet = 0.0 if moved else quiet + DRAIN_POLL
            last = now

    def close(self) -> None:
        """Stop copying, release every fd, stop the logger binary."""
        self._closed = True
        for scope in self._copiers:
            scope.cancel()
        self._resume_parked()
        if self._console is not None:
            self._console.close()
        self._fds.close_all()
        self._stdin_hold = self._stdin_fifo = self._stdin_pipe = None
        logger, self._logger = self._logger, None
        if logger is not None:
            logger.stop(self._nursery)
