"""Exercise the shim's code paths once in the template, before any fork.

Much of what a fresh shim would otherwise build lazily after fork (protobuf
message classes and their serializers, trio's per-run machinery, ttrpc
dispatch closures, logging formatters, compiled regexes, method caches) is
built here once, then shared copy-on-write by every forked shim. Nothing here
touches the outside world: a socketpair, no containers, no containerd.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import tomllib  # noqa: F401  (CRI runtime options are parsed after fork; import it before)
from collections.abc import Callable
from typing import TypeVar

import trio
from google.protobuf import any_pb2
from google.protobuf.message import Message

from shim.daemon.container import Context
from shim.daemon.events import EventPublisher
from shim.daemon.reaper import Exit, ExitRouter, Reaper
from shim.daemon.service import SERVICE_V2, TaskService
from shim.daemon.shimlog import LogrusFormatter
from shim.daemon.stdio import ProcessIO, StdioPaths
from shim.daemon.task_events import TaskEvents
from shim.proto import shim_pb2
from shim.runc_client.config import RuncConfig, Stdio
from shim.ttrpc import Client, Server, TTRPCError

#: A pid above any pid_max: the warm-up's processes never name a real one.
T = TypeVar("T")
_FAKE_PID = 1 << 30
ROUNDS = 3
_EXEC_SPEC = b'{"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}'


class _WarmRuntime:
    """An OCI runtime that runs nothing: each call succeeds at once, pids are fake.

    What a forked shim runs around runc (the service, the container and
    process rules, stdio, events, exits) runs here once with it, so the
    interpreter specialises that code in the template (its inline caches and
    counters are written here, not in every shim's copy of the page).
    """

    def __init__(self, config: RuncConfig, reaper: ExitRouter, /) -> None:
        self.reaper = reaper
        self.pids: list[int] = []

    def exit_all(self, status: int) -> None:
        for pid in self.pids:
            self.reaper.route(Exit(pid, status, time.time()))

    def _spawned(self, pid_file: str) -> None:
        pid = _FAKE_PID + len(self.pids)
        self.pids.append(pid)
        with open(pid_file, "w") as f:
            f.write(str(pid))

    async def create(self, id: str, bundle: str, pid_file: str, stdio: Stdio, **_: object) -> None:
        self._spawned(pid_file)

    async def exec(self, id: str, process_spec: str, pid_file: str, stdio: Stdio, **_: object) -> None:
        self._spawned(pid_file)

    async def restore(self, id: str, bundle: str, image_path: str, work_path: str, pid_file: str,
                      stdio: Stdio, **_: object) -> None:
        self._spawned(pid_file)

    async def ps(self, id: str) -> list[int]:
        return list(self.pids)

    async def _nothing(self, *args: object, **kwargs: object) -> None:
        await trio.lowlevel.checkpoint()

    start = kill = delete = pause = resume = update = checkpoint = _nothing


def _lifecycle(bundle: str) -> list[tuple[str, Message]]:
    """One task's requests as containerd sends them: create ... delete, with an exec."""
    spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=_EXEC_SPEC)
    return [
        ("Connect", shim_pb2.ConnectRequest(id="warm")),
        ("Create", shim_pb2.CreateTaskRequest(id="warm", bundle=bundle)),
        ("Start", shim_pb2.StartRequest(id="warm")),
        ("State", shim_pb2.StateRequest(id="warm")),
        ("Exec", shim_pb2.ExecProcessRequest(id="warm", exec_id="e1", spec=spec)),
        ("Start", shim_pb2.StartRequest(id="warm", exec_id="e1")),
        ("State", shim_pb2.StateRequest(id="warm", exec_id="e1")),
        ("ResizePty", shim_pb2.ResizePtyRequest(id="warm", exec_id="e1", width=80, height=24)),
        ("CloseIO", shim_pb2.CloseIORequest(id="warm", exec_id="e1", stdin=True)),
        ("Pids", shim_pb2.PidsRequest(id="warm")),
        ("Stats", shim_pb2.StatsRequest(id="warm")),
        ("Pause", shim_pb2.PauseRequest(id="warm")),
        ("Resume", shim_pb2.ResumeRequest(id="warm")),
        ("Update", shim_pb2.UpdateTaskRequest(id="warm")),
        ("Kill", shim_pb2.KillRequest(id="warm", exec_id="e1", signal=9)),
        ("Kill", shim_pb2.KillRequest(id="warm", signal=15)),
    ]


_ENDING = [
    ("Wait", shim_pb2.WaitRequest(id="warm", exec_id="e1")),
    ("Delete", shim_pb2.DeleteRequest(id="warm", exec_id="e1")),
    ("Wait", shim_pb2.WaitRequest(id="warm")),
    ("State", shim_pb2.StateRequest(id="warm")),
    ("Delete", shim_pb2.DeleteRequest(id="warm")),
    ("State", shim_pb2.StateRequest(id="gone")),  # NotFound
]


async def _calls(client: Client, requests: list[tuple[str, Message]], answers: list[tuple[str, str]]) -> None:
    """Send each request; answers gets (method, "" or the error's code name)."""
    for method, request in requests:
        try:
            await client.call(SERVICE_V2, method, request.SerializeToString(), timeout=1)
            answers.append((method, ""))
        except TTRPCError as e:  # an error answer warms its own path
            answers.append((method, e.code.name))


async def _exercise(bundle: str, rounds: int, answers: list[tuple[str, str]]) -> None:
    reaper = Reaper()
    publisher = EventPublisher("", "warm")
    server = Server()
    made: list[_WarmRuntime] = []

    def runtime(config: RuncConfig, router: ExitRouter, /) -> _WarmRuntime:
        made.append(_WarmRuntime(config, router))
        return made[-1]

    a, b = socket.socketpair()
    async with trio.open_nursery() as nursery:
        ctx = Context("warm", reaper, TaskEvents(publisher), nursery, runtime=runtime)
        TaskService(ctx).register(server)
        nursery.start_soon(server.serve_stream, trio.SocketStream(trio.socket.from_stdlib_socket(a)))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        async with Client(stream) as client:
            for _ in range(rounds):  # the interpreter specialises an instruction after a few runs
                await _calls(client, _lifecycle(bundle), answers)
                for rt in made:
                    rt.exit_all(137)  # the exits go through task_events, as a real exit goes
                await _calls(client, _ENDING, answers)
                made.clear()
        ProcessIO(StdioPaths()).close()
        nursery.cancel_scope.cancel()


async def _inline(fn: Callable[..., T], *args: object, **_: object) -> T:
    """trio.to_thread.run_sync during the warm-up: the template must fork with no thread but
    its own, and trio keeps an idle worker thread alive for 10 s after its job."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


def warm_up(rounds: int = ROUNDS) -> list[tuple[str, str]]:
    """Run the lifecycle rounds times; returns each request's (method, error code name or "")."""
    answers: list[tuple[str, str]] = []
    LogrusFormatter().format(logging.LogRecord("shim", logging.INFO, __file__, 0, "warm", None, None))
    with tempfile.TemporaryDirectory(prefix="shim-warm-") as bundle:
        with open(os.path.join(bundle, "config.json"), "w") as f:
            f.write('{"ociVersion": "1.0.2", "process": {"args": ["true"]}, "linux": {"namespaces": [{"type": "pid"}]}}')
        logging.disable(logging.WARNING)  # its fake pids have no cgroup: no warning in the template's log
        threaded = trio.to_thread.run_sync
        trio.to_thread.run_sync = _inline  # type: ignore[assignment]
        try:
            trio.run(_exercise, bundle, rounds, answers)
        finally:
            trio.to_thread.run_sync = threaded
            logging.disable(logging.NOTSET)
    return answers
