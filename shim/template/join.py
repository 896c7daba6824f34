"""A relayed start that joins a running shim, answered by the template itself.

A pod's second container (and every later one) needs no shim: its group's shim
serves it, and its ``start`` only prints that shim's address. A launcher child
forked for it costs far more than the answer: the fork, the copy-on-write faults
of the child as it runs, the shim-to-be it forks first, then two exits of
processes with the template's whole heap mapped. Measured on a CRI pod's
StartContainer (perf sched, 2 cores): ~9 ms of CPU against the Go shim's ~5 ms
for its whole ``start`` binary, ~8 ms from the relay's exec to its exit.

So when the bundle says the task belongs to another task's group (CRI's
sandbox-id, the explicit group annotation), the template answers in its own
process, after the relay's go (start_relay.c): it reads containerd's stdin,
places the task exactly as the launcher does (shim.launch.launcher.resolve)
and, when a shim answers on that socket, writes the address file and the output
and sends the status. Otherwise (the group's shim is gone, stdin did not end in
time) the start goes on as every other does, in a launcher child, given what was
read of stdin. Nothing here binds, forks or starts anything.
"""

from __future__ import annotations

import os
import time

from shim.common.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping, Sequence

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
    a group whose shim is gone are decided by ``answer``. Anything unreadable says no: the
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


def answer(args: Sequence[str], env: Mapping[str, str], cwd: str, stdio: Sequence[int]) -> int | Stdin:
    """Run a joining start here: its exit status, its output written to stdio[1] (a failure's
    message to stdio[2], as the launcher's run_start words it). When a launcher child must
    run it instead, what was read of stdin (stdio[0]) for that child."""
    from shim.launch.cli import parse_args
    from shim.launch.launcher import join_running, resolve

    stdin = read_stdin(stdio[0])
    if not stdin.complete:
        return stdin
    try:
        output = join_running(resolve(parse_args(list(args)), stdin.data, env, cwd))
    except (OSError, ValueError) as e:
        _write_all(stdio[2], f"start failed: {e}\n".encode())
        return 1
    if output is None:
        return stdin
    try:
        _write_all(stdio[1], output)
    except OSError:  # containerd is not reading: its start failed either way
        return 1
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
