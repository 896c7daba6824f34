"""A terminal process's pty: getting its master from runc, and copying it out.

With a terminal, runc creates the pty inside the container and sends us the
master over ``--console-socket``; we copy stdin fifo → master and master →
stdout (a fifo, a file, or a logger's fd 3). stderr is unused.

Copying stops at EOF (every slave fd closed), or, once the process exited or
the terminal was hung up, as soon as no more output arrives for
``CONSOLE_SETTLE`` (Go shuts the console down at exit). The terminal is hung
up when stdin is over: the master is closed, like Go's
``epollConsole.Shutdown`` + ``Close``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import termios

import trio

from shim.common.errors import ShimError

from .fds import OwnedFds, Sink, notify_closing

log = logging.getLogger("shim.stdio")  # the name the shim's log has always shown

#: How long start() waits for runc's connection on the console socket. runc
#: has already returned by then, so the connection is normally queued.
CONSOLE_ACCEPT_TIMEOUT = 30.0
#: After the process exited (or the terminal was hung up), how long the
#: terminal copy keeps waiting for more output before it stops, counted from
#: the last output (a slow reader of the copy must not cut off the tail).
CONSOLE_SETTLE = 0.05

_SOCKET_PATH_MAX = 107


class ConsoleSocket:
    """The socket runc connects to with the master, in a directory of its own.

    Under ``$XDG_RUNTIME_DIR`` when the path fits a socket address, as
    go-runc's ``NewTempConsoleSocket``; in the temp dir otherwise.
    """

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        if base and len(os.path.join(base, "ptyXXXXXXXX", "pty.sock")) > _SOCKET_PATH_MAX:
            base = None
        self._dir: str | None = tempfile.mkdtemp(prefix="pty", dir=base)
        self._listener: socket.socket | None = None
        self.path = os.path.join(self._dir, "pty.sock")
        try:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._listener.setblocking(False)
            self._listener.bind(self.path)
            self._listener.listen(1)
            if base:
                os.chmod(self.path, 0o755 | stat.S_ISVTX)  # go-runc NewTempConsoleSocket
        except BaseException:
            self.remove()
            raise

    async def receive_master(self) -> int:
        """Accept runc's connection and take the master it sends."""
        listener = self._listener
        assert listener is not None
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
            return await _receive_fd(conn)

    def remove(self) -> None:
        """Close the socket and remove its directory (a second call is a no-op)."""
        if self._listener is not None:
            notify_closing(self._listener)
            self._listener.close()
            self._listener = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class Console:
    """One terminal: its socket until the master arrived, then the master.

    Created before runc runs, so that a stop requested early (the process
    exited before start) still applies once the copy runs.
    """

    def __init__(self, fds: OwnedFds) -> None:
        self._fds = fds
        self.sink: Sink | None = None  # where the terminal's output goes
        self.master: int | None = None
        self._socket: ConsoleSocket | None = ConsoleSocket()
        #: Path runc must be given as --console-socket.
        self.socket_path = self._socket.path
        self._stop = False  # process exited or terminal hung up
        self._stop_deadline: float | None = None
        self._wake: trio.CancelScope | None = None
        self._reading = False
        self.hung_up = False

    @property
    def awaiting_master(self) -> bool:
        return self._socket is not None

    async def receive_master(self) -> None:
        """Take the master runc sent, and remove the socket either way."""
        assert self._socket is not None
        try:
            master = await self._socket.receive_master()
        finally:
            self.remove_socket()
        os.set_blocking(master, False)
        self.master = self._fds.own(master)

    def remove_socket(self) -> None:
        if self._socket is not None:
            self._socket.remove()
            self._socket = None

    async def copy(self, master: int) -> None:
        """master → stdout until the last slave closed (EIO), or the process
        exited / the terminal was hung up and nothing more arrives."""
        sink = self.sink
        self._reading = True
        try:
            while True:
                try:
                    data = self._fds.read(master)
                except BlockingIOError:
                    if self._stop and not await self._settle(master):
                        break
                    if not self._stop:
                        await self._wait(master)
                    continue
                except OSError as e:
                    if e.errno == errno.EIO:  # every slave fd is closed
                        break
                    raise
                if not data:
                    break
                self._stop_deadline = None  # output still moves: a fresh settle window after it
                if sink is not None:
                    await sink.write(data)
            if sink is not None:
                await sink.drain()
        except trio.ClosedResourceError:
            pass
        except OSError as e:
            log.warning("copying terminal output stopped: %s", e)
        finally:
            self._reading = False
            if sink is not None:
                sink.release()
            if self.hung_up:
                self._close_master()

    async def _wait(self, master: int) -> None:
        """Wait for output; stop() cuts the wait short."""
        with trio.CancelScope() as scope:
            self._wake = scope
            try:
                await self._fds.wait_readable(master)
            finally:
                self._wake = None

    async def _settle(self, master: int) -> bool:
        """After stop: True if more output arrived within the settle time."""
        if self._stop_deadline is None:
            self._stop_deadline = trio.current_time() + CONSOLE_SETTLE
        with trio.move_on_at(self._stop_deadline):
            await self._fds.wait_readable(master)
            return True
        return False

    def stop(self) -> None:
        """The process exited: copy only what still arrives within the settle time."""
        self._stop = True
        if self._wake is not None:
            self._wake.cancel()

    def hang_up(self) -> None:
        """stdin is over for a terminal: as Go, shut the console down and close it."""
        if self.master is None or self.hung_up:
            return
        self.hung_up = True
        self.stop()
        if not self._reading:
            self._close_master()

    def _close_master(self) -> None:
        if self.master is not None:
            self._fds.close(self.master)
            self.master = None

    def resize(self, width: int, height: int) -> None:
        """Set the window size; a no-op before or after the master is held."""
        if self.master is None:
            return
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self) -> None:
        """Remove the socket and forget the master (its owner closes the fd)."""
        self.remove_socket()
        self.master = None


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
