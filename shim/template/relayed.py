"""A start relayed by start-relay, run in the template itself.

start_relay.c hands the template containerd's ``start`` whole (arguments,
environment, working directory, stdio). Run in a launcher child forked for it, a
start costs the fork, the child's copy-on-write faults as it runs, the
shim-to-be it forks before anything else, and two exits of processes with the
template's heap mapped: measured on a CRI pod's StartContainer (perf sched, 2
cores), ~9 ms of CPU and ~8 ms from the relay's exec to its exit, against ~6 ms
for the Go shim's whole ``start`` binary.

So the template runs it: after the relay's go it reads containerd's stdin,
places the task as the launcher does (shim.launch.launcher.resolve), and either
joins the group's live shim (a pod's second container) or binds the socket and
hands it to a shim forked before any of this ran (server.ShimToBe, forked from
the template through a middle process, so that it is nobody's child and carries
none of this start's pages). A start that would spawn an interpreter (the
namespace shim) or whose stdin did not end in time goes to a launcher child as
before, with what was read of stdin.

Which starts need no shim is told from the bundle alone (``likely_joins``), so
that no shim-to-be is forked for them.
"""

from __future__ import annotations

import os
import time

from shim.common.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping, Sequence

    from shim.launch.launcher import Origin

#: How long the template waits for containerd to finish writing stdin (the runtime options,
#: written and closed by a goroutine right after the exec) before a child takes over.
STDIN_TIMEOUT = 0.5


@record
class Stdin:
    """What was read of containerd's stdin, and whether that was all (EOF)."""

    data: bytes = b""
    complete: bool = False


def likely_joins(args: Sequence[str], cwd: str) -> bool:
    """Whether a start's bundle puts its task in another task's group (a pod's container).

    A hint, read without stdin (which only the relay's go lets us consume): namespace mode and
    a group whose shim is gone are decided by ``serve``. Anything unreadable says no: the
    launcher child then meets it and reports it as it always has."""
    from shim.launch.cli import UsageError, parse_args
    from shim.launch.grouping import group_id

    try:
        flags = parse_args(list(args))
    except UsageError:
        return False
    if flags.action != "start" or flags.info or flags.version or not flags.id:
        return False
    try:
        group = group_id(flags.bundle or cwd, flags.id)
    except (OSError, ValueError):
        return False
    return group not in ("", flags.id)


def read_stdin(fd: int, timeout: float = STDIN_TIMEOUT) -> Stdin:
    """fd up to EOF, or what came within timeout. A terminal or an unreadable fd reads as
    empty, as the launcher's own read does."""
    import select

    try:
        if os.isatty(fd):
            return Stdin(b"", True)
    except OSError:
        return Stdin(b"", True)
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return Stdin(b"".join(chunks), False)
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        except OSError:
            return Stdin(b"", True)
        if not data:
            return Stdin(b"".join(chunks), True)
        chunks.append(data)


def serve(args: Sequence[str], env: Mapping[str, str], cwd: str, stdio: Sequence[int],
          origin: Origin | None) -> int | Stdin:
    """Run a relayed start here: its exit status, its output written to stdio[1] (a failure's
    message to stdio[2], as the launcher's run_start words it). ``origin`` forks its shim;
    None when the start is expected to join (see likely_joins). When a launcher child
    must run it instead, what was read of stdin (stdio[0]) for that child."""
    from shim.launch.cli import parse_args
    from shim.launch.launcher import join_running, launch, resolve

    stdin = read_stdin(stdio[0])
    if not stdin.complete:
        return stdin
    try:
        request = resolve(parse_args(list(args)), stdin.data, env, cwd)
        if request.placement.shared:
            return stdin  # the namespace shim is an interpreter of its own: spawned by a child
        output = join_running(request) if origin is None else launch(request, origin)
    except (OSError, ValueError) as e:
        _write_all(stdio[2], f"start failed: {e}\n".encode())
        return 1
    if output is None:
        return stdin  # the group's shim is gone: a shim after all
    try:
        _write_all(stdio[1], output)
    except OSError:  # containerd is not reading: its start failed either way
        return 1
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
