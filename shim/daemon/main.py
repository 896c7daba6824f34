"""The long-lived shim process: one trio run serving the task API.

``main(config)`` is a plain function with no import-time state, so it can be
called by a freshly exec'd interpreter (``run_from_env``) or by a child
forked from a warm template. One nursery owns every long-lived activity:
the reaper, the event publisher, the ttrpc server, and (in a nested nursery)
each container's exit monitors and IO copiers.

Shutdown: the Shutdown RPC sets ``shutdown_requested``; we stop accepting,
let in-flight RPCs answer, give queued events a few seconds to reach
containerd, then cancel everything and remove our socket.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys

import trio

from shim import __version__
from shim.common import nofile
from shim.common.config import CONFIG_ENV, MALLOC_ENV, ShimConfig
from shim.thp import set_child_subreaper
from shim.ttrpc import Server

from .container import Context
from .events import EventPublisher
from .giveback import GiveBack
from .oom import OOMWatcher
from .reaper import Reaper
from .service import TaskService
from .shimlog import setup_logging
from .task_events import TaskEvents
from .title import set_title

log = logging.getLogger("shim.daemon")

EVENT_DRAIN_TIMEOUT = 5.0
SHUTDOWN_GRACE = 2.0  # how long in-flight RPCs may still run after Shutdown


async def serve(listener: socket.socket, config: ShimConfig, name: SocketName | None = None) -> None:
    reaper = Reaper()
    publisher = EventPublisher(config.ttrpc_address, config.namespace)
    oom = OOMWatcher()
    server = Server()
    giveback = GiveBack()
    server.on_disconnect = giveback.poke
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        await nursery.start(oom.run)
        await nursery.start(giveback.run)
        nursery.start_soon(publisher.run)
        async with trio.open_nursery() as processes:
            ctx = Context(config.namespace, reaper, TaskEvents(publisher), processes, config.thp_original, oom)
            service = TaskService(ctx, version=__version__)
            service.register(server)
            async with trio.open_nursery() as serving:
                serving.start_soon(server.serve, trio.socket.from_stdlib_socket(listener))
                log.debug("serving")
                nursery.start_soon(_start_worker_thread)
                await service.shutdown_requested.wait()
                log.info("shutting down")
                # Free the address first: a start of this group from now on must bind a new
                # shim, not join this one, which will answer no Create any more.
                if name is not None:
                    name.release()
                server.close()
                # In-flight calls get to answer, but a Wait on a process that
                # never exits must not keep the shim alive forever.
                serving.cancel_scope.deadline = trio.current_time() + (0 if service.shutdown_now else SHUTDOWN_GRACE)
            if not await publisher.drain(EVENT_DRAIN_TIMEOUT):
                log.error("exiting with %d events containerd never received", publisher.pending)
            processes.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def _start_worker_thread() -> None:
    """Start the worker thread a Create's rootfs mount will run in, now, while containerd
    connects: a forked shim has none, and starting one costs ~0.6 ms that would otherwise
    sit inside the first Create. trio keeps an idle worker for 10 s, then lets it go."""
    await trio.to_thread.run_sync(_nothing)


def _nothing() -> None:
    pass


def main(config: ShimConfig) -> int:
    setup_logging(config.bundle, config.debug)
    log.debug("shim %s starting (pid %d)", config.id, os.getpid())
    set_child_subreaper()
    nofile.remember(config.nofile_original)
    nofile.raise_soft_limit()  # a forked shim has its template's limit
    nofile.reserve.refill()  # so that every task stays killable and deletable
    os.chdir(config.bundle)
    listener = socket.socket(fileno=config.listen_fd)
    name = SocketName(config.socket_path)
    try:
        trio.run(serve, listener, config, name)
    except BaseException:
        log.exception("shim %s failed", config.id)
        return 1
    finally:
        name.release()
    return 0


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class SocketName:
    """The shim's socket file name, given up exactly once.

    A shim that shuts down frees its name first, so that a start of its group from then on
    binds a new shim; that successor's socket may get the very inode number ours had (ext4
    reuses freed inodes at once), so the name is released only once, and only while the file
    there is still ours (device, inode and change time as they were when we started).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._identity = _identity(path) if path else None

    def release(self) -> None:
        identity, self._identity = self._identity, None
        if identity is None or _identity(self.path) != identity:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def run_from_env() -> None:
    """Entry for the exec'd shim; the config is taken out of the environment
    so runc and containers do not inherit it."""
    config = ShimConfig.decode(os.environ[CONFIG_ENV])
    set_title(config.title())  # before the environment changes
    del os.environ[CONFIG_ENV]
    os.environ.pop(MALLOC_ENV, None)  # chosen for this interpreter only (shim.launch.launcher.spawn)
    # What the imports made lives as long as the shim: out of the collector's sight, as in a
    # shim forked from the template (which froze its heap), the first full collection no
    # longer walks it (~13 ms, inside whichever request it fell on; ~4 ms for the one before).
    gc.freeze()
    sys.exit(main(config))
