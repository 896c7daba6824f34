"""Give memory back to the system after connections go away (issue 16).

Anyone with the shim's uid can open a thousand connections or pipeline ten thousand
requests; a namespace shim lives as long as its namespace has tasks, so what such a burst
made it allocate must not stay for good. Two things keep it otherwise: the burst's trio
tasks and sockets sit in reference cycles (a finished task's frames and exceptions) that
only a full collection frees, and an idle shim allocates nothing, so the collector never
runs; and freed memory stays in the allocator's heap. After the last of a series of
disconnects, ``GiveBack`` runs one full collection and ``malloc_trim(0)`` (glibc: free pages
anywhere in the heap go back, not only its top). That helps the most in a namespace shim,
which runs on malloc (shim.launch.launcher.spawn); under pymalloc, arenas that one live
object pins stay.

It waits on an event, so an idle shim gets no wake-ups; one pass costs a full collection
(~10 ms per 100 tasks' objects), at most once per ``MIN_INTERVAL``.
"""

from __future__ import annotations

import ctypes
import gc
import logging

import trio

log = logging.getLogger("shim.giveback")

#: Quiet time after a disconnect before memory is given back: a burst ends first.
DELAY = 1.0
#: Between two passes at least this long, whatever the churn of connections.
MIN_INTERVAL = 5.0


def _malloc_trim() -> None:
    """glibc's malloc_trim(0); nothing where the C library has none (musl)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class GiveBack:
    """Gives memory back once connections stopped going away for ``DELAY`` seconds."""

    def __init__(self) -> None:
        self._wanted = trio.Event()
        #: Ends DELAY after the latest disconnect (each poke pushes its deadline back).
        self._quiet = trio.CancelScope()
        self.passes = 0

    def poke(self) -> None:
        """A connection closed (called from the loop)."""
        self._quiet.deadline = trio.current_time() + DELAY
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wanted.wait()
            with self._quiet:
                await trio.sleep_forever()
            self._wanted, self._quiet = trio.Event(), trio.CancelScope()
            self.give_back()
            await trio.sleep(MIN_INTERVAL)

    def give_back(self) -> None:
        gc.collect()
        _malloc_trim()
        self.passes += 1
        log.debug("gave memory back (pass %d)", self.passes)
