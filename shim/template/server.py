"""The warm template: one pre-imported process per containerd that forks shims.

A shim exec'd from scratch spends ~150 ms of CPU importing trio and protobuf
and keeps ~15 MB of private memory. Instead, the first ``start`` also spawns
a template that imports everything once, collects and freezes its heap
(``gc.freeze``: the GC no longer touches those objects, so their pages stay
shared after fork) and waits on a root-only socket. Later ``start``s send it
the shim's listening socket (SCM_RIGHTS) and config; it forks a shim.

The shim is a grandchild (fork, setsid, fork): the template never has it as
a child, so a template crash or exit touches no running shim, and the
template has nothing to reap but the short-lived middle process.

Correctness never depends on the template: the launcher's side
(shim/launch/template_client.py, which also defines the protocol) falls back
to spawning a shim itself, and this side refuses any request whose deadline
has passed, so the two can never both start a shim for one socket. The heap
sharing (immortal objects, filled pools) is shim/template/heap.py.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass

from shim.common import inotify
from shim.common.config import LISTEN_FD, PROCESS_NAME, ShimConfig
from shim.common.record import as_dict
from shim.daemon.title import set_title
from shim.launch.template_client import GO, STALE, fingerprint, package_dir

from .heap import fill_malloc_bins, fill_partial_pools, immortalize_heap, tag_types

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import _socket
    import socket

IDLE_TIMEOUT = 600.0  # seconds without a request before the template exits
REAP_INTERVAL = 1.0  # how often an idle template collects its exited launcher children
CONNECTION_TIMEOUT = 0.2  # a connected client that sends nothing is dropped after this
GO_TIMEOUT = 2.0  # a launcher child whose relay does not say go within this exits unseen
MAX_MESSAGE = 1 << 20
LAUNCH = b"launch"  # start-relay's request: run a whole start here (start_relay.c)

#: The code this template was started with (template_client.fingerprint); a request
#: finding other code on disk is answered STALE and the template exits.
_started_with = ""

#: Anything that can change a file's name, content, size or mtime, or a directory's.
_IN_CHANGES = (inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_FROM
               | inotify.IN_MOVED_TO | inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_DELETE_SELF
               | inotify.IN_MOVE_SELF)


class CodeWatch:
    """Whether the package's files may have changed since the last look, without walking them.

    The fingerprint walk stats every source file (~0.4 ms per start); an inotify watch on each
    of the package's directories answers "nothing happened" with one read that fails. Any event
    (or no inotify at all) means "maybe": the caller walks as before, so a change is never
    missed, only confirmed. Watches are (re)added after every event: new directories too."""

    def __init__(self, package: str) -> None:
        self._package = package
        try:
            self.fd = inotify.init()
        except OSError:
            self.fd = -1
        if self.fd >= 0 and not self._watch():
            os.close(self.fd)
            self.fd = -1

    def _watch(self) -> bool:
        for dirpath, dirnames, _ in os.walk(self._package):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            try:
                inotify.add_watch(self.fd, dirpath, _IN_CHANGES)
            except OSError:  # e.g. fs.inotify.max_user_watches reached
                return False
        return True

    def quiet(self) -> bool:
        """True only if no file or directory of the package changed since the last call."""
        if self.fd < 0:
            return False
        try:
            changed = bool(os.read(self.fd, 1 << 16))
        except BlockingIOError:
            return True
        while changed:  # drain, then watch anything new; the caller walks
            try:
                changed = bool(os.read(self.fd, 1 << 16))
            except BlockingIOError:
                break
        if not self._watch():
            os.close(self.fd)
            self.fd = -1
        return False


_code_watch: CodeWatch | None = None


def _code_changed() -> bool:
    """The code on disk is no longer the code this template runs."""
    if _code_watch is not None and _code_watch.quiet():
        return False
    return fingerprint() != _started_with


def _peer_uid(conn: socket.socket) -> int:
    import socket
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[2]
    return uid


def _peer_nofile(conn: socket.socket) -> int:
    """The peer's (start-relay's, so containerd's) soft open-file limit; 0 if unknown.

    The launcher child runs with this template's raised limit (shim.common.nofile), and the
    limit runc and the containers get back must be the one containerd gave its start."""
    import resource
    import socket
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    try:
        return resource.prlimit(struct.unpack("3i", creds)[0], resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return 0


def _claim(path: str) -> int | None:
    """Hold <path>.lock for our lifetime; None if another template holds it.

    Only the lock holder may remove a stale socket and bind, so two templates
    started at once can never both end up running (the kernel drops the lock
    when its holder dies, however it dies).
    """
    import fcntl

    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _bind(path: str) -> socket.socket:
    """Listen at path, replacing a dead template's socket (we hold the lock)."""
    import socket

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _become_shim(config: ShimConfig, env: dict[str, str], listener_fd: int, go_fd: int = -1) -> None:
    """In the forked grandchild: turn into the shim, never return.

    Serves only once the launcher said go (see request_fork): a launcher that
    gave up on this fork closes the pipe, and this shim exits unseen.
    """
    code = 1
    try:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if go_fd >= 0 and os.read(go_fd, len(GO)) != GO:
            code = 0
            return
        if listener_fd != LISTEN_FD:
            os.dup2(listener_fd, LISTEN_FD)
        os.closerange(LISTEN_FD + 1, 1 << 16)  # the template's sockets and anything else
        set_title(config.title())  # before the environment changes
        os.environ.clear()
        os.environ.update(env)
        os.chdir(config.bundle)
        from shim.daemon.main import main as serve

        code = serve(config)
    finally:
        os._exit(code)


def fork_shim(config: ShimConfig, env: dict[str, str], listener_fd: int, go_fd: int = -1) -> int:
    """Fork, setsid, fork: the shim is orphaned at once, never our child."""
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if middle == 0:
        try:
            os.close(r)
            os.setsid()
            shim = os.fork()
            if shim == 0:
                os.close(w)
                _become_shim(config, env, listener_fd, go_fd)
            os.write(w, str(shim).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.waitpid(middle, 0)
        data = os.read(r, 32)
    finally:
        os.close(r)
    return int(data) if data else 0


def _serve_one(conn: socket.socket) -> bool:
    """Answer one request; False once the code on disk changed (the template must go)."""
    import ast
    import socket

    conn.settimeout(CONNECTION_TIMEOUT)  # one idle client must not hold up every start
    if _peer_uid(conn) != os.getuid():
        return True
    message, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 3)
    try:
        if _code_changed():
            conn.send(STALE)
            return False
        if message.startswith(LAUNCH + b"\0"):
            if len(fds) == 3:
                _serve_launch(conn, message, fds)
            return True
        if len(fds) != 2:
            return True
        request = ast.literal_eval(message.decode())
        if not isinstance(request, dict):
            return True
        if time.monotonic() > request["deadline"]:
            conn.send(b"late")
            return True  # the launcher has fallen back (or is about to)
        pid = fork_shim(ShimConfig.decode(request["config"]), request["env"], fds[0], fds[1])
        conn.send(str(pid).encode())
        return True
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class LaunchRequest:
    """What start-relay sends: launch \0 ppid \0 thp \0 cwd \0 nargs \0 args... \0 env... \0"""

    parent: int
    thp_original: int
    cwd: str
    args: list[str]
    env: dict[str, str]

    @classmethod
    def parse(cls, message: bytes) -> LaunchRequest:
        fields = [os.fsdecode(f) for f in message.split(b"\0")]
        if len(fields) < 6 or fields[-1] != "" or fields[0] != LAUNCH.decode():
            raise ValueError("malformed launch request")
        body, nargs = fields[:-1], int(fields[4])
        args, env = body[5 : 5 + nargs], body[5 + nargs :]
        if len(args) != nargs or not all("=" in e for e in env):
            raise ValueError("malformed launch request")
        return cls(int(fields[1]), int(fields[2]), fields[3], args, dict(e.split("=", 1) for e in env))


def _serve_launch(conn: socket.socket, message: bytes, stdio: list[int]) -> None:
    """Fork a child that runs the launcher for start-relay; answer with its pid."""
    request = LaunchRequest.parse(message)
    nofile = _peer_nofile(conn)
    pid = os.fork()
    if pid == 0:
        _become_launcher(conn, stdio, request, nofile)
    conn.send(str(pid).encode())


def _become_launcher(conn: socket.socket, stdio: list[int], request: LaunchRequest, nofile: int = 0) -> None:
    """In the forked child: be the ``start`` process containerd ran, never return.

    Its stdio are the relay's (containerd reads them), its environment and working
    directory containerd's; it waits for the relay's "go" (see start_relay.c), runs
    the launcher's start with an Origin (containerd's pid and THP setting, and the
    shim-to-be forked first thing, see ShimToBe), then sends its exit status to the relay."""
    code = 1
    shim: ShimToBe | None = None
    try:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # the shim-to-be is then a member of this session, as fork_shim's shims are
        # Forked before the relay's go (the relay's round trip overlaps the fork) and before this
        # child has run anything: the shim's pages are the template's, not this start's.
        shim = ShimToBe()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        _close_all_but(3, conn.fileno(), shim.fd)  # the template's listener, lock and the received fds
        conn.settimeout(GO_TIMEOUT)
        try:
            said = conn.recv(len(GO))
        except OSError:
            said = b""
        if said != GO:
            code = 0  # the relay fell back: this start is not ours
            return
        os.environ.clear()
        os.environ.update(request.env)
        try:
            os.chdir(request.cwd)
        except OSError as e:  # the bundle went away since the relay sent it: say so, as run_start would
            print(f"start failed: {e}", file=sys.stderr)
            return
        code = _run_start(request, shim, nofile)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            if shim is not None:
                shim.let_go()  # it no longer holds containerd's pipes either
            # containerd reads the start's output until every holder has closed it, and an
            # exiting process closes its files only after tearing down its memory (~1 ms for
            # a fork of this heap): let go of them first, the relay exits on the status.
            os.closerange(0, 3)
            conn.send(bytes([code & 0xFF]))
        finally:
            os._exit(code)


def _run_start(request: LaunchRequest, shim: ShimToBe, nofile: int = 0) -> int:
    from shim.launch.cli import USAGE, UsageError, parse_args, run_start
    from shim.launch.launcher import Origin

    try:
        flags = parse_args(request.args)
    except UsageError as e:
        print(f"{e}\n{USAGE}", file=sys.stderr)
        return 2
    if flags.action != "start" or flags.info or flags.version:
        print(f"start-relay relays start only, not {request.args!r}", file=sys.stderr)
        return 2
    return run_start(flags, Origin(request.parent, request.thp_original, shim.become, nofile))


class ShimToBe:
    """The shim of a relayed start: a fork of the launcher child made before it ran anything,
    which waits for its config and listener (SCM_RIGHTS) and then becomes the shim.

    Forked from the launcher child as it ran the start, a shim would carry every page that
    start wrote (argument parsing, grouping, binding; ~225 KiB private per shim, measured
    with bench.memattr). This fork happens when the child is still a clean copy of the
    template, and costs the start nothing more: the fork the shim needs anyway, moved ahead.
    It is the launcher child's child, as a shim forked by it would be (the same session,
    orphaned when the child exits, never containerd's or the template's). A start that needs
    no shim (a live shim of its group serves it) or fails drops it: it reads EOF and exits."""

    def __init__(self) -> None:
        import socket

        self.error: OSError | None = None
        self.pid = 0
        ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = os.fork()
        except OSError as e:  # the start fails when it needs the shim, as a failed fork would fail it
            self.error = e
        if self.pid == 0 and self.error is None:
            ours.detach()  # closed with everything else in _wait_for_orders
            _wait_for_orders(its)
        its.close()
        self._sock: socket.socket | None = ours
        self.fd = ours.fileno()

    def become(self, config: ShimConfig, listener: _socket.socket) -> int:
        """Origin.fork: hand it the config, this start's environment and the listener; its pid."""
        import marshal  # builtin, imported by importlib: no parsing in the shim (ast would cost ~0.3 ms and its pages)
        import socket

        if self.error is not None:
            raise self.error
        assert self._sock is not None
        socket.send_fds(self._sock, [marshal.dumps((as_dict(config), dict(os.environ)))], [listener.fileno()])
        return self.pid

    def let_go(self) -> None:
        """Wait until it holds none of containerd's pipes; drop it if it was not needed."""
        if self._sock is None:
            return
        if self.error is None:
            try:
                self._sock.recv(1)  # it says so as soon as its stdio are /dev/null
            except OSError:
                pass
        self._sock.close()
        self._sock = None


def _wait_for_orders(sock: socket.socket) -> None:
    """In the shim-to-be: let go of everything the launcher child holds, wait for the config
    and the listener, become the shim; never return."""
    import marshal
    import signal
    import socket

    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _close_all_but(0, sock.fileno())  # containerd's pipes (the relay's stdio), the template's sockets
        null = os.open(os.devnull, os.O_RDWR)  # fd 0: the lowest free
        os.dup2(null, 1)
        os.dup2(null, 2)
        sock.send(b"!")
        message, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not message or len(fds) != 1:
            code = 0  # the start needed no shim, or failed
            return
        config, env = marshal.loads(message)
        sock.detach()  # its fd may be the one the listener is moved to (LISTEN_FD)
        _become_shim(ShimConfig(**config), env, fds[0])
    finally:
        os._exit(code)


def _close_all_but(first: int, *keep: int) -> None:
    """Close every fd from first on except keep."""
    for fd in sorted(k for k in keep if k >= first):
        os.closerange(first, fd)
        first = fd + 1
    os.closerange(first, 1 << 16)


def _reap_children() -> None:
    """Collect launcher children that have exited (fork_shim waits for its own middle)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _warm_up() -> None:
    """Import and initialise everything a shim uses, so children share it."""
    import setproctitle  # noqa: F401

    # The whole shim; and the launcher: a start relayed here runs it in a forked child that forks
    # the shim, so a module that child imported would be private memory in that shim (measured
    # with bench.memattr: 5.2 -> 4.6 MiB private per shim).
    import shim.daemon.main
    import shim.launch.cli
    import shim.launch.launcher  # noqa: F401

    from .warmup import pack_shim_code

    pack_shim_code()  # runs the warm-up (warmup.py), packs the code it ran, warms the copies
    from shim.common import nofile

    nofile.reserve.release()  # the warm-up's runc calls filled it (runc_client): the template serves no task
    tag_types()
    gc.collect()
    immortalize_heap()
    fill_malloc_bins()
    fill_partial_pools()  # last: anything allocated and freed after it would leave holes again
    gc.freeze()
    if os.environ.get("SHIM_PY_HEAPDUMP"):  # only for bench/memattr.py; imported only then
        from .heapdump import dump_if_asked

        dump_if_asked()  # in a forked child: the template's heap stays as it is


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(0)  # unwinds through main's cleanup


def main() -> None:
    import signal

    global _started_with, _code_watch
    _code_watch = CodeWatch(package_dir())  # before the walk: a change during it is an event
    _started_with = fingerprint()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    path = sys.argv[1]
    set_title(f"{PROCESS_NAME} template {path}")
    if _claim(path) is None:
        return  # another template serves this containerd
    sock = _bind(path)
    pid_file = path + ".pid"
    inode = os.stat(path).st_ino
    try:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        # A SIGTERM during warm-up could raise SystemExit inside a callback whose
        # exceptions are ignored (a weakref's, a __del__), and the template would
        # live on: hold it until warm-up is done, then take it in the accept loop.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            _warm_up()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        sock.settimeout(REAP_INTERVAL)
        idle_until = time.monotonic() + IDLE_TIMEOUT
        serving = True
        while serving:
            _reap_children()
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                if time.monotonic() > idle_until:
                    break
                continue
            idle_until = time.monotonic() + IDLE_TIMEOUT
            with conn:
                try:
                    serving = _serve_one(conn)
                except Exception:  # noqa: BLE001 - a malformed request must never end the template
                    _log_failure()
    finally:
        # Remove the socket only if it is still ours (not a successor's).
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
        for leftover in (pid_file, path + ".lock"):  # a successor locks a new file
            try:
                os.unlink(leftover)
            except OSError:
                pass
        _remove_if_empty(path + ".log")
        sock.close()


def _log_failure() -> None:
    """A request the template could not serve: its traceback, timestamped, on stderr (the log)."""
    import traceback

    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: request failed\n")
    traceback.print_exc()
    sys.stderr.flush()


def _remove_if_empty(path: str) -> None:
    try:
        if os.stat(path).st_size == 0:
            os.unlink(path)
    except OSError:
        pass
