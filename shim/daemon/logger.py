"""A ``binary://`` logger: the process a container's output is handed to.

As Go's ``binaryIO`` (pkg/process/io.go): the logger binary is started with
fd 3 = stdout, fd 4 = stderr, fd 5 = a pipe it closes once ready, argv = the
stdio URI's query keys and (first) values, env = CONTAINER_ID and
CONTAINER_NAMESPACE only. The container writes straight into the logger's
pipes; stdin is not connected. Stopping it is SIGTERM, then SIGKILL after
``LOGGER_TERM_TIMEOUT``.

The logger is our child, reaped by the shim's reaper like any other: we only
ever look at it through a pidfd, which does not reap and cannot reach a
recycled pid.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
from dataclasses import dataclass

import trio

from shim.common.errors import ShimError
from shim.common.nofile import restore_for

from .fds import OwnedFds, notify_closing
from .isolation import Spawner

log = logging.getLogger("shim.stdio")  # the name the shim's log has always shown

#: Go's binaryIOProcTermTimeout: SIGTERM, then SIGKILL after this long.
LOGGER_TERM_TIMEOUT = 12.0


@dataclass
class Logger:
    """A running logger binary, seen through its pidfd."""

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

    async def wait_ready(self, fds: OwnedFds) -> None:
        """Wait until the logger closed fd 5 (Go: no time limit)."""
        fd = self.ready
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
            self.ready = None
            fds.close(fd)

    def stop(self, nursery: Spawner | None) -> None:
        """Go's binaryIO.Close (its pipes are closed already): SIGTERM, SIGKILL after 12s.

        The wait for the SIGTERM to work runs in ``nursery``; without one (or
        once the shim is shutting down) the logger is killed at once.
        """
        if not self.exited():
            self.signal(signal.SIGTERM)
            if nursery is not None:
                try:
                    nursery.start_soon(_stop_later, self)
                    return
                except RuntimeError:
                    pass  # the shim is shutting down
            self.signal(signal.SIGKILL)
        os.close(self.pidfd)


def start_logger(
    fds: OwnedFds, path: str, args: tuple[str, ...], out_r: int, err_r: int, *, id: str, namespace: str
) -> Logger:
    """Spawn the logger on the read ends of the container's stdout/stderr pipes.

    ``out_r`` and ``err_r`` are closed here: the logger holds its own copies
    (binaryIO.CloseAfterStart). The ready pipe's read end is owned by ``fds``.
    """
    ready_r, ready_w = fds.pipe()
    os.set_blocking(ready_r, False)  # waited for in the trio loop: a slow logger must not stall the shim
    high: list[int] = []
    try:
        # Above 5 first, so the dup2s onto 3, 4, 5 cannot clobber each other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (out_r, err_r, ready_w)]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ] + [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
        env = {"CONTAINER_ID": id, "CONTAINER_NAMESPACE": namespace}
        pid = os.posix_spawn(
            path,
            [path, *args],
            env,
            file_actions=actions,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as e:
        raise ShimError(f"failed to start binary process {path}: {e.strerror}") from e
    else:
        restore_for(pid)  # the open-file limit the shim was started with, as for runc
    finally:
        for fd in high:
            os.close(fd)
        for fd in (out_r, err_r, ready_w):
            fds.close(fd)
    try:
        pidfd = os.pidfd_open(pid)  # no checkpoint since the spawn: not reaped yet
    except OSError:
        os.kill(pid, signal.SIGKILL)
        raise
    return Logger(pid, pidfd, ready_r)


async def _stop_later(logger: Logger) -> None:
    try:
        with trio.move_on_after(LOGGER_TERM_TIMEOUT):
            await trio.lowlevel.wait_readable(logger.pidfd)
            return
        log.warning("logger binary %d still running %.0fs after SIGTERM, killing it", logger.pid, LOGGER_TERM_TIMEOUT)
        logger.signal(signal.SIGKILL)
    finally:
        notify_closing(logger.pidfd)
        os.close(logger.pidfd)
