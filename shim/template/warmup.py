"""Exercise the shim's code paths once in the template, before any fork.

Much of what a fresh shim would otherwise build lazily after fork (protobuf
message classes and their serializers, trio's per-run machinery, ttrpc
dispatch closures, logging formatters, compiled regexes, method caches) is
built here once, then shared copy-on-write by every forked shim. Nothing here
touches the outside world: a socketpair, no containers, no containerd.
"""

from __future__ import annotations

import logging
import socket
import tomllib  # noqa: F401  (CRI runtime options are parsed after fork; import it before)

import trio

from shim.daemon.container import Context
from shim.daemon.events import EventPublisher
from shim.daemon.reaper import Reaper
from shim.daemon.service import SERVICE_V2, TaskService
from shim.daemon.shimlog import LogrusFormatter
from shim.daemon.stdio import ProcessIO, StdioPaths
from shim.daemon.task_events import TaskEvents
from shim.proto import shim_pb2
from shim.ttrpc import Client, Server, TTRPCError

_REQUESTS = [
    ("State", shim_pb2.StateRequest(id="warm")),
    ("Connect", shim_pb2.ConnectRequest(id="warm")),
    ("Pids", shim_pb2.PidsRequest(id="warm")),
    ("Kill", shim_pb2.KillRequest(id="warm", signal=15)),
    ("Wait", shim_pb2.WaitRequest(id="warm")),
    ("Delete", shim_pb2.DeleteRequest(id="warm")),
]


async def _exercise() -> None:
    reaper = Reaper()
    publisher = EventPublisher("", "warm")
    server = Server()
    a, b = socket.socketpair()
    async with trio.open_nursery() as nursery:
        events = TaskEvents(publisher)
        ctx = Context("warm", reaper, events, nursery)
        TaskService(ctx).register(server)
        nursery.start_soon(server.serve_stream, trio.SocketStream(trio.socket.from_stdlib_socket(a)))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        async with Client(stream) as client:
            for method, request in _REQUESTS:
                try:
                    await client.call(SERVICE_V2, method, request.SerializeToString(), timeout=1)
                except TTRPCError:
                    pass  # NotFound: the point is the round trip
        events.exited("warm", "warm", 1, 1, 0.0)  # through task_events, as a real exit goes
        ProcessIO(StdioPaths()).close()
        nursery.cancel_scope.cancel()


def warm_up() -> None:
    LogrusFormatter().format(logging.LogRecord("shim", logging.INFO, __file__, 0, "warm", None, None))
    trio.run(_exercise)
