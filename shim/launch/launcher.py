"""The ``start`` action: bind the shim's socket, start the shim, print its address.

This runs on every container start, so it imports nothing heavy (no trio,
no protobuf) and prints nothing on stderr: containerd reads stdout and
stderr together as its answer. What containerd sends and expects differs
per release (plain address, JSON, or the 2.3 bootstrap protobuf); that is
shim.launch.bootstrap's business; which shim serves the task is
shim.launch.grouping's.

Order matters for THP: the launcher disables THP for itself first, so the
shim it spawns has it disabled from its first page; the original value
travels in the config and is restored for runc (see shim.thp). The same for the
open-file limit: raised to the hard limit here, given back to runc, the
containers and logger binaries (see shim.common.nofile).
"""

from __future__ import annotations

import errno
import os
import sys

from shim.common import lean
from shim.common.bundle import ADDRESS_FILE, write_atomic
from shim.common.config import CGROUP_ROOT, CONFIG_ENV, LISTEN_FD, MALLOC_ENV, ShimConfig
from shim.common.nofile import raise_soft_limit
from shim.common.record import record
from shim.thp import disable_for_self

from . import template_client
from .bootstrap import launch_settings, parse_start_input, render_start_output
from .flags import Flags
from .grouping import place

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import _socket
    from collections.abc import Callable

SPAWN = "from shim.daemon.main import run_from_env; run_from_env()"
SHARED_ALLOCATOR = "malloc"  # a namespace shim's (see spawn)


@record  # not dataclasses: importing it costs every start ~15 ms (shim.common.record)
class Origin:
    """A start run inside the warm template (for start-relay) rather than in a process of its own.

    What the launcher would otherwise learn from its own process comes from the
    relay, and the shim is forked from the warm heap instead of asked for."""

    parent: int  # containerd's pid (the relay's parent): the shim's OOM score follows it
    thp_original: int  # containerd's THP setting (the relay's): runc and containers get it back
    fork: Callable[[ShimConfig, _socket.socket], int]  # starts the shim (forked from the warm heap); its pid
    nofile_original: int = 0  # the relay's soft RLIMIT_NOFILE (containerd's): the same (shim.common.nofile)


def bind(path: str) -> _socket.socket | None:
    """Listen on path (mode 0600); None if a live shim already serves it.

    Under the socket directory's lock (lean.socket_dir_lock): between a
    launcher's bind and its listen the socket refuses connections, and a
    concurrent launcher of the same group (a pod's containers, a namespace's
    tasks), or a ``delete`` action cleaning up after a dead shim of it, would
    take it for a dead shim's leftover, remove it and let a second shim start.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o711, exist_ok=True)
    with lean.socket_dir_lock(directory):
        return _bind_or_join(path)


def _bind_or_join(path: str) -> _socket.socket | None:
    sock = lean.unix_socket()
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            if lean.accepts(path):
                sock.close()
                return None
            os.unlink(path)  # a dead shim's leftover
            sock.bind(path)
        sock.listen(4096)  # as the Go shim: a burst of connects must not get EAGAIN
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_stdin() -> bytes:
    """containerd writes the runtime options (an Any) or, 2.3+, a BootstrapParams on stdin."""
    try:
        if os.isatty(0):
            return b""
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""


def _oom_score_above_parent(pid: int, parent: int = 0) -> None:
    """Like the Go shim: the shim is a slightly better OOM victim than containerd.

    A failure fails the start (OSError), as in Go, except a refusal to raise the score
    when we are not root (Go: unprivileged or in a user namespace), which is ignored.
    """
    with open(f"/proc/{parent or os.getppid()}/oom_score_adj") as f:
        text = f.read()
    try:
        score = int(text)
    except ValueError:
        raise OSError(f"oom_score_adj of containerd: {text.strip()!r}") from None
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except PermissionError:
        if os.geteuid() == 0:
            raise


def join_cgroup(pid: int, path: str, root: str = CGROUP_ROOT) -> None:
    """Move the shim into Options.shim_cgroup, as the Go shim's start does.

    cgroup v2: <root>/<path>/cgroup.procs. v1 (also hybrid): every mounted
    hierarchy that has <path>; at least one must. Like Go, a missing cgroup
    fails the start rather than leaving the shim somewhere unexpected.
    """
    rel = path.lstrip("/")
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        targets = [os.path.join(root, rel)]
    else:
        targets = [
            os.path.join(entry.path, rel)
            for entry in os.scandir(root)
            if entry.is_dir() and entry.name != "unified" and os.path.isdir(os.path.join(entry.path, rel))
        ]
    joined = 0
    for target in targets:
        try:
            with open(os.path.join(target, "cgroup.procs"), "w") as f:
                f.write(str(pid))
            joined += 1
        except FileNotFoundError:
            continue
    if not joined:
        raise FileNotFoundError(f"shim cgroup {path} does not exist under {root}")


def spawn(config: ShimConfig, sock: _socket.socket, shared: bool = False) -> int:
    """Exec a fresh interpreter running the shim, with the listener as fd 3.

    A ``shared`` shim (one per namespace) runs on the C library's malloc instead of
    pymalloc: it serves whoever connects for as long as the namespace has tasks, and after
    a burst of connections pymalloc keeps every 1 MiB arena that one surviving object
    pins, ~10 MiB for 1000 connections, while freed malloc memory goes back with
    ``malloc_trim`` (shim.daemon.giveback). It costs ~1 MiB at start and ~1.5 KiB per task
    (bench: 1/100/300 tasks), which a per-task shim, forked from the template's pymalloc
    heap or spawned for a single task, would pay for nothing.
    """
    import subprocess

    if sock.fileno() != LISTEN_FD:
        os.dup2(sock.fileno(), LISTEN_FD)  # the launcher is about to exit: clobbering fd 3 is fine
    # The flags after -c only label the process for ps, like the Go shim's
    # re-exec; the shim reads its configuration from the environment.
    env = {**os.environ, CONFIG_ENV: config.encode()}
    isolation = ["-I"]
    if shared:
        # -I would ignore PYTHONMALLOC with every PYTHON* variable: drop them ourselves
        # instead (-I is -E -s -P); the shim takes PYTHONMALLOC out again for its children.
        env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
        env[MALLOC_ENV] = SHARED_ALLOCATOR
        isolation = ["-s", "-P"]
    argv = [sys.executable, *isolation, "-c", SPAWN, "-namespace", config.namespace, "-id", config.id]
    argv += ["-address", config.address]
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(LISTEN_FD,),
        cwd=config.bundle,
        start_new_session=True,
    )
    proc.returncode = 0  # never waited for: it outlives us
    return proc.pid


def _start_shim(config: ShimConfig, sock: _socket.socket, shared: bool = False, origin: Origin | None = None) -> int:
    """Fork the shim from the warm template if there is one, else spawn it (and a template).

    A ``shared`` shim (ShimGroup = "namespace") is spawned and never needs a
    template: it is started once per namespace, and a template kept alive for
    it would cost more than it saves (its whole heap, ~30 MiB Pss, against the
    ~13 MiB a fork saves once).
    """
    if shared:
        return spawn(config, sock, shared=True)
    if not template_client.enabled():
        return spawn(config, sock)
    if origin is not None:  # we run in the template's child: it has the shim forked already, waiting for this
        return origin.fork(config, sock)
    template_path = template_client.socket_path(config.address, os.path.dirname(config.socket_path))
    pid, template_alive = template_client.request_fork(template_path, config, sock)
    if pid is None and not template_alive and template_client.spawn_template(template_path):
        pid = template_client.fork_when_ready(template_path, config, sock)
    return pid if pid is not None else spawn(config, sock)


def start(flags: Flags, origin: Origin | None = None) -> int:
    bundle = flags.bundle or os.getcwd()
    given = parse_start_input(_read_stdin(), flags, os.environ)
    thp_original = disable_for_self() if origin is None else origin.thp_original
    # Raised before the shim or a template is started from here; a start inside the template
    # has the template's raised limit, so containerd's comes from the relay (Origin).
    nofile_original = raise_soft_limit() if origin is None else origin.nofile_original
    settings = launch_settings(given.options_any)
    placement = place(bundle, given.instance_id, given.namespace, given.grpc_address, given.socket_directory,
                      settings.shim_group)
    path = placement.socket_path
    address = "unix://" + path
    sock = bind(path)
    if sock is not None:
        config = ShimConfig(
            namespace=given.namespace,
            id=given.instance_id,
            bundle=bundle,
            address=given.grpc_address,
            publish_binary=given.containerd_binary,
            ttrpc_address=given.ttrpc_address,
            socket_path=path,
            listen_fd=LISTEN_FD,
            debug=given.debug,
            thp_original=thp_original,
            nofile_original=nofile_original,
        )
        try:
            pid = _start_shim(config, sock, shared=placement.shared, origin=origin)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            sock.close()
        try:
            _oom_score_above_parent(pid, origin.parent if origin is not None else 0)
            cgroup = settings.shim_cgroup()
            if cgroup:
                join_cgroup(pid, cgroup)
        except OSError:
            # As Go's start: a shim that is not the OOM victim it should be, or outside
            # its cgroup, must not serve.
            os.kill(pid, lean.SIGKILL)
            os.unlink(path)
            raise
    write_atomic(os.path.join(bundle, ADDRESS_FILE), address)
    sys.stdout.buffer.write(render_start_output(address, given))
    sys.stdout.flush()
    return 0
