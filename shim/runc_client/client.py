"""Drive runc through subprocesses, waited for by the shim's reaper.

Every invocation: ``runc --root R --log <bundle>/log.json --log-format json
[--systemd-cgroup] <command> ...``, started through ``shim.thp.runc_command``,
which puts the host's THP policy back (the shim itself runs with THP disabled)
and kills runc if the shim dies. Its exit status comes from the reaper, never from
``Popen.wait`` (which would race the reaper's ``waitpid(-1)``).

runc reports failures both on stderr and as ``"level":"error"`` lines in the
JSON log; ``create``/``exec`` hand stderr to the container, so for those the log
is the only source. RuncError carries runc's own words either way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol

import trio

from shim.common import nofile
from shim.common.errors import ResourceExhausted
from shim.daemon.reaper import Watch
from shim.thp import runc_command

from .config import NOT_STARTED, RuncConfig, RuncError, Stdio, last_log_error, log_size, start_error

log = logging.getLogger("shim.runc")


class ExitWatcher(Protocol):
    """What runc_client needs from the reaper."""

    def watch(self, pid: int) -> Watch: ...

    def unwatch(self, watch: Watch) -> None: ...


async def _read_all(fd: int) -> bytes:
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Child:
    """A runc just started: its process, the watch on its pid, our ends of its pipes."""

    proc: subprocess.Popen[bytes]
    watch: Watch
    out_r: int | None
    err_r: int | None
    in_w: int | None


#: Commands that stop, remove or inspect a task: they may take the fd reserve (shim.common.nofile).
_MAY_TAKE_RESERVE = frozenset({"kill", "delete", "state", "ps", "start", "pause", "resume"})
#: Commands that add a process: refused at once when the fds are gone.
_ADDS = frozenset({"create", "exec", "restore"})
#: How long a call that found no fd waits for other runc calls to give theirs back.
FD_WAIT = 10.0
FD_RETRY_POLL = 0.05


class _FdPressure:
    """What a runc call does when the shim is out of fds (EMFILE while starting runc).

    A call that stops or removes a task takes the reserve and tries again; then, like
    any other call, it waits for a runc call in flight to give its fds back (kill of
    every task at once needs ~6 fds per call). A call that would add a process fails at
    once with ResourceExhausted: the shim serves on, and the caller learns why.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self._freed = trio.Event()

    async def wait(self, command: str, error: OSError, deadline: float) -> None:
        """Return when trying again makes sense; raise ResourceExhausted when it does not."""
        if command in _MAY_TAKE_RESERVE and nofile.reserve.release():
            log.warning("runc %s: out of fds (%s): using the reserve", command, error.strerror)
            return
        if command in _ADDS or trio.current_time() >= deadline:
            raise ResourceExhausted(
                f"runc {command}: {error.strerror} (the shim is at its open-file limit of {nofile.current()})"
            ) from error
        # Nothing in flight: fds may still come back (a connection or a task's IO closing).
        with trio.move_on_at(deadline if self.in_flight else trio.current_time() + FD_RETRY_POLL):
            await self._freed.wait()

    def started(self) -> None:
        self.in_flight += 1

    def freed(self) -> None:
        """A runc call ended: its fds are back. Wake the waiters, take the reserve back."""
        self.in_flight -= 1
        self._freed.set()
        self._freed = trio.Event()
        if nofile.reserve.held < nofile.reserve.size:
            nofile.reserve.refill()


_fds = _FdPressure()


class Runc:
    def __init__(self, config: RuncConfig, reaper: ExitWatcher) -> None:
        self.config = config
        self._reaper = reaper

    async def run(
        self, *args: str, stdio: Stdio | None = None, input: bytes | None = None, keep_fds: tuple[int, ...] = ()
    ) -> bytes:
        """Run one runc command; return its stdout, raise RuncError on failure.

        With ``stdio`` the command's stdio are the given fds (create/exec hand
        them to the container) and nothing is captured. ``keep_fds`` stay open,
        at the same numbers, in runc (runc marks them close-on-exec before the
        container's process runs, unless told to preserve them).
        """
        argv = self.config.global_args() + list(args)
        began = time.perf_counter()
        log_offset = log_size(self.config.log_path)
        deadline = 0.0
        while True:
            try:
                child = self._spawn(args[0], argv, stdio, input, keep_fds)
                break
            except OSError as e:
                if not nofile.exhausted(e):
                    raise
                deadline = deadline or trio.current_time() + FD_WAIT
                await _fds.wait(args[0], e, deadline)
        spawned = time.perf_counter()
        _fds.started()
        proc, watch, out_r, err_r, in_w = child.proc, child.watch, child.out_r, child.err_r, child.in_w
        out = err = b""
        results: dict[str, bytes] = {}

        async def collect(name: str, fd: int) -> None:
            results[name] = await _read_all(fd)

        try:
            async with trio.open_nursery() as nursery:
                if out_r is not None and err_r is not None:  # stdio is None: capture
                    nursery.start_soon(collect, "out", out_r)
                    nursery.start_soon(collect, "err", err_r)
                    if in_w is not None and input is not None:
                        nursery.start_soon(_feed, in_w, input)
                exit = await watch.wait()
        except BaseException:
            # Cancelled (a request's deadline, shutdown) or failed while runc runs: a runc
            # nobody waits for must not go on changing the container behind our back.
            self._abandon(proc.pid, watch)
            raise
        finally:
            # Popen must never waitpid itself (it would race the reaper, or
            # reap a recycled pid); a returncode marks it as done even when
            # we were cancelled and the reaper will collect runc unseen.
            proc.returncode = watch.exit.status if watch.exit else -1
            _fds.freed()
        if log.isEnabledFor(logging.DEBUG):  # the bench's timeline reads these
            now = time.perf_counter()
            log.debug("runc %s: %.2f ms (spawn %.2f ms)", args[0], (now - began) * 1e3, (spawned - began) * 1e3)
        if stdio is None:
            out, err = results["out"], results["err"]
        if exit.status != 0:
            detail = err.decode(errors="replace").strip()
            if not detail or stdio is not None:
                detail = last_log_error(self.config.log_path, log_offset) or detail
            raise RuncError(args[0], exit.status, detail)
        return out

    def _spawn(
        self, command: str, argv: list[str], stdio: Stdio | None, input: bytes | None, keep_fds: tuple[int, ...]
    ) -> _Child:
        """Start runc and watch its pid (no await in between: the reaper cannot have run yet)."""
        child_ends: list[int] = []  # closed in the parent once runc holds them
        out_r = err_r = in_w = None
        try:
            if stdio is not None:
                child = [subprocess.DEVNULL if fd is None else fd for fd in (stdio.stdin, stdio.stdout, stdio.stderr)]
            else:
                in_fd: int = subprocess.DEVNULL
                if input is not None:
                    in_fd, in_w = os.pipe2(os.O_CLOEXEC)
                    child_ends.append(in_fd)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                child_ends += [out_w, err_w]
                child = [in_fd, out_w, err_w]
            proc = self._popen(command, argv, child, keep_fds)
            watch = self._reaper.watch(proc.pid)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        return _Child(proc, watch, out_r, err_r, in_w)

    def _popen(
        self, command: str, argv: list[str], child: list[int], keep_fds: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Fork and exec runc (the exit comes from the reaper, never a blocking wait); a binary
        that cannot be run is a RuncError in Go's words, whichever the command."""
        try:
            argv, preexec = runc_command(argv, self.config.thp_original)
            return subprocess.Popen(
                argv,
                stdin=child[0],
                stdout=child[1],
                stderr=child[2],
                preexec_fn=preexec,  # noqa: PLW1509 - None where thp-exec is built; else prctl calls only
                process_group=0,
                pass_fds=keep_fds,
                env={**os.environ, **self.config.extra_env} if self.config.extra_env else None,
            )
        except OSError as e:
            detail = start_error(self.config.binary, e)
            if detail is None:
                raise
            raise RuncError(command, NOT_STARTED, detail) from e

    def _abandon(self, pid: int, watch: Watch) -> None:
        """Kill runc's process group (runc is its leader) and stop watching it. Its pid is
        still ours while the reaper (in this trio loop) has not delivered its exit."""
        if watch.exit is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        self._reaper.unwatch(watch)

    async def create(
        self,
        id: str,
        bundle: str,
        pid_file: str,
        stdio: Stdio,
        *,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        console_socket: str | None = None,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self.run(*args, id, stdio=stdio)

    async def exec(
        self,
        id: str,
        process_spec: str,
        pid_file: str,
        stdio: Stdio,
        *,
        console_socket: str | None = None,
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        """``runc exec --detach``; ``process_spec`` may name one of ``keep_fds``
        (``/proc/self/fd/N``: runc opens it in its own process)."""
        args = ["exec", "--detach", "--process", process_spec, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio, keep_fds=keep_fds)

    async def checkpoint(self, id: str, image_path: str, work_path: str, flags: list[str]) -> None:
        await self.run("checkpoint", "--image-path", image_path, "--work-path", work_path, *flags, id)

    async def restore(
        self,
        id: str,
        bundle: str,
        image_path: str,
        work_path: str,
        pid_file: str,
        stdio: Stdio,
        *,
        parent_path: str = "",
        no_pivot: bool = False,
        console_socket: str | None = None,
    ) -> None:
        args = ["restore", "--detach", "--no-subreaper", "--bundle", bundle, "--pid-file", pid_file]
        args += ["--image-path", image_path, "--work-path", work_path]
        if parent_path:
            args += ["--parent-path", parent_path]
        if no_pivot:
            args.append("--no-pivot")
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio)

    async def pause(self, id: str) -> None:
        await self.run("pause", id)

    async def resume(self, id: str) -> None:
        await self.run("resume", id)

    async def update(self, id: str, resources_json: bytes) -> None:
        await self.run("update", "--resources", "-", id, input=resources_json)

    async def start(self, id: str) -> None:
        await self.run("start", id)

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [id, str(signal)]
        await self.run(*args)

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self.run("delete", *(["--force"] if force else []), id)

    async def ps(self, id: str) -> list[int]:
        out = await self.run("ps", "--format", "json", id)
        return [int(p) for p in json.loads(out or b"null") or []]


async def _feed(fd: int, data: bytes) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
