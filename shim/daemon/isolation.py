"""Fault isolation between the containers one shim serves.

A shim may serve a whole pod or, with ShimGroup = "namespace", every task of
a namespace. Each container's background work (exit monitors, stdio copiers,
logger shutdowns) runs in the shim's one nursery, where an uncaught exception
would cancel everything: every other container's copiers, the reaper, the
server. ``Isolated`` is a container's view of that nursery: a task that fails
is logged with the container's id and counted, and nothing else stops. The
container itself stays controllable (State, Kill, Delete), and its exits are
still published: ``shim.daemon.exits.monitor`` records an exit whatever failed around it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

log = logging.getLogger("shim.isolation")


class Spawner(Protocol):
    """What container and stdio code needs of a nursery."""

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> None: ...


class Isolated:
    """Start tasks in ``nursery`` so that their failures stay this owner's."""

    def __init__(self, nursery: trio.Nursery, owner: str) -> None:
        self._nursery = nursery
        self.owner = owner
        #: Failures so far (a container with faults is still served; the log says what failed).
        self.faults = 0

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> None:
        self._nursery.start_soon(self._guarded, async_fn, args, name=name or async_fn)

    async def _guarded(self, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await async_fn(*args)
        except Exception:  # Cancelled and KeyboardInterrupt are BaseExceptions: they pass
            self.faults += 1
            log.exception("%s: %s failed; the shim and its other containers go on",
                          self.owner, getattr(async_fn, "__qualname__", async_fn))
