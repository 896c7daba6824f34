"""Exercise the shim's code paths once in the template, before any fork.

Much of what a fresh shim would otherwise build lazily after fork (protobuf
message classes and their serializers, trio's per-run machinery, ttrpc
dispatch closures, logging formatters, compiled regexes, method caches) is
built here once, then shared copy-on-write by every forked shim. Nothing here
touches the outside world: a socketpair, no containers, no containerd.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import tomllib  # noqa: F401  (CRI runtime options are parsed after fork; import it before)
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from google.protobuf import any_pb2
from google.protobuf.message import Message

from shim.common.wire import RUNTIME_OPTIONS_TYPE
from shim.daemon.cgroups import container_cgroup
from shim.daemon.container import Context
from shim.daemon.events import SERVICE as EVENTS_SERVICE
from shim.daemon.events import EventPublisher
from shim.daemon.giveback import GiveBack
from shim.daemon.oom import OOMWatcher
from shim.daemon.reaper import Exit, ExitRouter, Reaper
from shim.daemon.service import SERVICE_V2, TaskService
from shim.daemon.shimlog import LogrusFormatter
from shim.daemon.stdio import ProcessIO, StdioPaths
from shim.daemon.task_events import TaskEvents
from shim.proto import runtimeoptions_pb2, shim_pb2
from shim.runc_client.client import Runc
from shim.runc_client.config import RuncConfig, Stdio
from shim.ttrpc import Client, Server, TTRPCError, open_client

from .heap import fill_malloc_bins, fill_partial_pools, pack_code, version_globals

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from types import CodeType

#: A pid above any pid_max: the warm-up's processes never name a real one.
_FAKE_PID = 1 << 30
ROUNDS = 3
_EXEC_SPEC = b'{"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}'
#: The runtime options TOML CRI names for a runtime handler of ours (its ``options.ConfigPath``).
RUNTIME_TOML = "runtime.toml"
_RUNTIME_TOML_TEXT = 'BinaryName = "runc"\nSystemdCgroup = false\n'
#: The fifos a task's output goes to: containerd makes them (ctr and CRI alike) and the shim's
#: output copiers splice into them; the warm-up's Create names two in its bundle.
STDOUT_FIFO, STDERR_FIFO = "stdout", "stderr"


class _WarmRuntime:
    """An OCI runtime whose containers do not exist: pids are fake.

    What a forked shim runs around runc (the service, the container and
    process rules, stdio, events, exits) runs here once with it, so the
    interpreter specialises that code in the template (its inline caches and
    counters are written here, not in every shim's copy of the page). Each
    runtime call also goes through the real runc client with ``true`` as the
    binary (thp-exec, subprocess, the reaper, the pipes): that code is what
    every shim runs first, and unwarmed it was the largest share of the code
    a shim wrote (bench.memattr: Popen._execute_child, Runc.run, ...).
    """

    def __init__(self, config: RuncConfig, reaper: ExitRouter, /) -> None:
        self.reaper = reaper
        self.pids: list[int] = []
        true = shutil.which("true")
        self.real = Runc(RuncConfig(binary=true), reaper) if true and isinstance(reaper, Reaper) else None

    def exit_all(self, status: int) -> None:
        for pid in self.pids:
            self.reaper.route(Exit(pid, status, time.time()))

    def _spawned(self, pid_file: str) -> None:
        pid = _FAKE_PID + len(self.pids)
        self.pids.append(pid)
        with open(pid_file, "w") as f:
            f.write(str(pid))

    async def create(self, id: str, bundle: str, pid_file: str, stdio: Stdio, **_: object) -> None:
        if self.real is not None:
            await self.real.create(id, bundle, pid_file, stdio)
        self._spawned(pid_file)

    async def exec(self, id: str, process_spec: str, pid_file: str, stdio: Stdio, **_: object) -> None:
        if self.real is not None:
            await self.real.exec(id, process_spec, pid_file, stdio)
        self._spawned(pid_file)

    async def restore(self, id: str, bundle: str, image_path: str, work_path: str, pid_file: str,
                      stdio: Stdio, **_: object) -> None:
        self._spawned(pid_file)

    async def ps(self, id: str) -> list[int]:
        return list(self.pids)

    async def _nothing(self, *args: object, **kwargs: object) -> None:
        await trio.lowlevel.checkpoint()

    checkpoint = _nothing

    async def _via_true(self, call: Callable[[Runc], Awaitable[None]]) -> None:
        if self.real is None:
            await trio.lowlevel.checkpoint()
        else:
            await call(self.real)

    async def start(self, id: str) -> None:
        await self._via_true(lambda runc: runc.start(id))

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        await self._via_true(lambda runc: runc.kill(id, signal, all=all))

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self._via_true(lambda runc: runc.delete(id, force=force))

    async def pause(self, id: str) -> None:
        await self._via_true(lambda runc: runc.pause(id))

    async def resume(self, id: str) -> None:
        await self._via_true(lambda runc: runc.resume(id))

    async def update(self, id: str, resources_json: bytes) -> None:
        await self._via_true(lambda runc: runc.update(id, resources_json))


def _cri_options(bundle: str) -> any_pb2.Any:
    """CreateTaskRequest.options as CRI sends them for our runtime handler: a
    runtimeoptions.v1.Options naming the handler's TOML. Every pod shim parses it (tomllib,
    the hand-decoded wire format) at its first Create: unwarmed, that code was written in each."""
    options = runtimeoptions_pb2.Options(config_path=os.path.join(bundle, RUNTIME_TOML))
    return any_pb2.Any(type_url=RUNTIME_OPTIONS_TYPE, value=options.SerializeToString())


def _lifecycle(bundle: str) -> list[tuple[str, Message]]:
    """One task's requests as containerd sends them: create ... delete, with an exec."""
    spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=_EXEC_SPEC)
    return [
        ("Connect", shim_pb2.ConnectRequest(id="warm")),
        ("Create", shim_pb2.CreateTaskRequest(id="warm", bundle=bundle, options=_cri_options(bundle),
                                              stdout=os.path.join(bundle, STDOUT_FIFO),
                                              stderr=os.path.join(bundle, STDERR_FIFO))),
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


def _listening(path: str) -> trio.socket.SocketType:
    """A listening unix socket at path, handed to trio as a shim's listener is (main.serve)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return trio.socket.from_stdlib_socket(sock)


async def _forwarded(payload: bytes, ctx: object) -> bytes:
    """containerd's side of Events/Forward: take the event, answer an empty message."""
    return b""


async def _exercise(bundle: str, rounds: int, answers: list[tuple[str, str]]) -> None:
    """The lifecycle rounds over real unix sockets: the task server accepts the warm-up's
    client as a shim accepts containerd, and the events reach a stand-in for containerd's
    events service as a shim's reach containerd (connect, Forward)."""
    reaper = Reaper()
    events, tasks = os.path.join(bundle, "events.sock"), os.path.join(bundle, "task.sock")
    publisher = EventPublisher(events, "warm")
    server, containerd = Server(), Server()
    containerd.register(EVENTS_SERVICE, "Forward", _forwarded)
    made: list[_WarmRuntime] = []

    def runtime(config: RuncConfig, router: ExitRouter, /) -> _WarmRuntime:
        made.append(_WarmRuntime(config, router))
        return made[-1]

    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)  # as serve() starts it: the real runc client's exits come through it
        await nursery.start(containerd.serve, _listening(events))
        nursery.start_soon(publisher.run)
        ctx = Context("warm", reaper, TaskEvents(publisher), nursery, runtime=runtime)
        TaskService(ctx).register(server)
        await nursery.start(server.serve, _listening(tasks))
        async with open_client(tasks) as client:
            for _ in range(rounds):  # the interpreter specialises an instruction after a few runs
                await _calls(client, _lifecycle(bundle), answers)
                for rt in made:
                    rt.exit_all(137)  # the exits go through task_events, as a real exit goes
                await _calls(client, _ENDING, answers)
                made.clear()
        for _ in range(rounds):
            await _watch_own_cgroup()
            GiveBack().give_back()  # a shim's pass after its connections went away (gc, malloc_trim)
        await publisher.drain(EVENT_DRAIN_TIMEOUT)
        ProcessIO(StdioPaths()).close()
        nursery.cancel_scope.cancel()


async def _watch_own_cgroup() -> None:
    """A shim's OOM watcher, run and armed on this process's own memory cgroup (a v1 eventfd or
    a v2 inotify watch), then disarmed: every shim arms one for each container it creates (the
    warm-up's fake pids have no cgroup), code that otherwise ran first in each. Nothing is
    written to the cgroup but the v1 event registration, which ends with its eventfd."""
    oom = OOMWatcher()
    async with trio.open_nursery() as nursery:
        await nursery.start(oom.run)
        try:
            oom.add("warm", os.getpid(), _no_oom)
        except OSError:  # no memory cgroup here: nothing to warm
            pass
        else:
            await trio.lowlevel.checkpoint()  # its watch tasks start
            oom.remove("warm")
        nursery.cancel_scope.cancel()


def _no_oom(key: str) -> None:
    """The warm-up's OOM callback: its own cgroup running out of memory is no task's event."""


#: How long the warm-up waits for its events to reach the stand-in containerd.
EVENT_DRAIN_TIMEOUT = 2.0


#: trio's worker idle timeout during the warm-up: each worker ends right after its job.
WORKER_IDLE = 0.001
#: How long the warm-up waits for each of trio's worker threads to end.
THREAD_JOIN_TIMEOUT = 5.0


def _join_worker_threads() -> None:
    """Wait until the warm-up's worker threads have ended: the template must fork with no
    thread but its own."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(THREAD_JOIN_TIMEOUT)


def _warm_cgroups(rounds: int) -> None:
    """Resolve and read this process's own cgroups (read only), as a shim does for its
    container at create and for each Stats (CRI asks every few seconds): the warm-up's
    containers have fake pids, so its requests never reach this code."""
    for _ in range(rounds):
        try:
            container_cgroup(os.getpid()).metrics_any()
        except OSError:
            return


def warm_up(rounds: int = ROUNDS) -> list[tuple[str, str]]:
    """Run the lifecycle rounds times; returns each request's (method, error code name or "").

    trio.to_thread runs for real (a shim's first Create mounts in a worker thread): the thread
    code is warmed here too, and with trio's idle timeout near 0 each worker ends after its job.
    """
    from trio._core import _thread_cache

    answers: list[tuple[str, str]] = []
    _warm_cgroups(rounds)
    LogrusFormatter().format(logging.LogRecord("shim", logging.INFO, __file__, 0, "warm", None, None))
    with tempfile.TemporaryDirectory(prefix="shim-warm-") as bundle:
        with open(os.path.join(bundle, "config.json"), "w") as f:
            f.write('{"ociVersion": "1.0.2", "process": {"args": ["true"]}, "linux": {"namespaces": [{"type": "pid"}]}}')
        with open(os.path.join(bundle, RUNTIME_TOML), "w") as f:
            f.write(_RUNTIME_TOML_TEXT)
        for fifo in (STDOUT_FIFO, STDERR_FIFO):
            os.mkfifo(os.path.join(bundle, fifo), 0o600)
        logging.disable(logging.WARNING)  # its fake pids have no cgroup: no warning in the template's log
        idle = _thread_cache.IDLE_TIMEOUT
        _thread_cache.IDLE_TIMEOUT = WORKER_IDLE  # type: ignore[assignment]  # trio's int, read as a timeout
        try:
            trio.run(_exercise, bundle, rounds, answers)
            for _ in range(rounds - 1):  # trio.run's own set-up and loop, as each shim runs it once
                trio.run(trio.lowlevel.checkpoint)
        finally:
            _join_worker_threads()  # first: a worker reads the timeout again before it ends
            _thread_cache.IDLE_TIMEOUT = idle
            logging.disable(logging.NOTSET)
    return answers


def code_run_by(run: Callable[[], object], started: list[CodeType] | None = None) -> list[CodeType]:
    """The code objects ``run()`` ran, in the order each first started (sys.monitoring), appended
    to started (a new list if None) as they start; empty (having run it) before 3.12 or when
    no monitoring tool id is free. A code object already seen by an earlier call is not again."""
    monitoring: Any = getattr(sys, "monitoring", None)  # 3.12+
    tool = None if monitoring is None else next((t for t in range(6) if monitoring.get_tool(t) is None), None)
    if tool is None:
        run()
        return []
    if started is None:
        started = []

    def on_start(code: CodeType, offset: int) -> object:
        started.append(code)
        return monitoring.DISABLE  # once per code object

    monitoring.use_tool_id(tool, "shim template")
    try:
        monitoring.register_callback(tool, monitoring.events.PY_START, on_start)
        monitoring.set_events(tool, monitoring.events.PY_START)
        run()
    finally:
        monitoring.set_events(tool, 0)
        monitoring.register_callback(tool, monitoring.events.PY_START, None)
        monitoring.free_tool_id(tool)
    return started


def code_run_in_child(run: Callable[[], object]) -> list[CodeType]:
    """The code a forked child runs and no earlier code_run_by saw: the fork handlers
    (threading's, logging's, random's), then ``run()``; in the order each first started.
    Nothing the child does stays in this process: it sends the ids of what it ran through a
    pipe, and only code objects that existed before the fork (kept alive here) count."""
    import types

    known: dict[int, CodeType] = {}
    stack = [f.__code__ for f in gc.get_objects() if type(f) is types.FunctionType]
    while stack:  # with the code nested in it (closures, lambdas, generator expressions)
        code = stack.pop()
        if id(code) not in known:
            known[id(code)] = code
            stack.extend(c for c in code.co_consts if type(c) is types.CodeType)
    started: list[CodeType] = []
    ids: list[int] = []

    def fork() -> None:
        since = len(started)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(r)
                run()
                status = 0
            finally:
                os.write(w, " ".join(str(id(c)) for c in started[since:]).encode())
                os._exit(status)
        os.close(w)
        with os.fdopen(r, "rb") as f:  # read before the wait: the child may fill the pipe
            ids.extend(int(x) for x in f.read().split())
        os.waitpid(pid, 0)

    code_run_by(fork, started)
    return list({i: known[i] for i in ids if i in known}.values())


def _shim_start() -> None:
    """In a forked child: what a forked shim runs before it serves that the warm-up does not
    (shim.template.server._become_shim, shim.daemon.main.main): its environment replaced,
    its logging set up on the bundle's log fifo, a first line, the subreaper flag, its fd
    limit and reserve, its socket's name."""
    from shim.common import nofile
    from shim.common.bundle import LOG_FIFO
    from shim.daemon.main import SocketName, log
    from shim.daemon.shimlog import setup_logging
    from shim.thp import set_child_subreaper

    env = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="shim-warm-") as bundle:
        path = os.path.join(bundle, LOG_FIFO)
        os.mkfifo(path, 0o600)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        setup_logging(bundle, False)
        log.info("shim %s starting (pid %d)", "warm", os.getpid())
        set_child_subreaper()
        nofile.remember(nofile.raise_soft_limit())
        nofile.reserve.refill()
        SocketName(path).release()
        os.close(reader)


def package_code(package: str) -> list[CodeType]:
    """The code of every function of the package's modules, by module and line."""
    import types

    prefix = package + "."
    functions = [f for f in gc.get_objects()
                 if type(f) is types.FunctionType and (f.__module__ or "").startswith(prefix)]
    codes = {id(f.__code__): f.__code__ for f in functions}
    return sorted(codes.values(), key=lambda c: (c.co_filename, c.co_firstlineno))


def pack_shim_code() -> int:
    """Run the warm-up, pack the code a shim runs (heap.pack_code) and warm the copies; returns
    how many code objects moved (0 where pack_code does nothing: the warm-up has still run).

    First the code one warm-up lifecycle runs, in the order it first ran; then the rest of
    this package's own functions (a shim's start-up, the launcher, paths the warm-up does not
    take). The stdlib and libraries' code the warm-up never ran stays where it was."""
    lifecycle = code_run_by(lambda: warm_up(rounds=1))  # what runs, once is enough: the copies get ROUNDS
    lifecycle += code_run_in_child(_shim_start)
    seen = {id(c) for c in lifecycle}
    fill_malloc_bins()  # the copies go to fresh memory, one after another, not into holes
    fill_partial_pools()
    moved = pack_code(lifecycle + [c for c in package_code("shim") if id(c) not in seen])
    if moved:
        warm_up()  # the copies start cold
    version_globals()
    return moved
