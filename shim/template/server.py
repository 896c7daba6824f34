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

Correctness never depends on the template. The launcher falls back to
spawning a shim itself when the template is missing, refuses, or does not
answer before the request's deadline; the template refuses any request whose
deadline has passed, so the two can never both start a shim for one socket.
The socket name carries a fingerprint of the installed code, so an upgrade
gets a new template and the old one idles out.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from . import lean
from .config import PROCESS_NAME, ShimConfig, set_title

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import _socket
    import socket
    from collections.abc import Mapping

SOCKET_DIR = "/run/containerd/s"
ENV_DISABLE = "SHIM_PY_TEMPLATE"  # "0": never use or start a template
IDLE_TIMEOUT = 600.0  # seconds without a request before the template exits
REQUEST_TIMEOUT = 1.0  # the template refuses a request it reads later than this
ANSWER_MARGIN = 0.5  # the launcher waits REQUEST_TIMEOUT plus this for the pid
ANSWER_POLL = 0.05  # how often a waiting launcher checks that the template is not stopped
CONNECTION_TIMEOUT = 0.2  # a connected client that sends nothing is dropped after this
GO = b"go"  # the launcher's word to a forked shim that it may serve
MAX_MESSAGE = 1 << 20
LISTEN_FD = 3
MAIN = "from shim.template import main; main()"


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(ENV_DISABLE, "1") != "0"


def fingerprint() -> str:
    """Which code a template runs: the interpreter, the package path and its files' mtimes."""
    package = os.path.dirname(os.path.realpath(__file__))
    # sys.executable, not sys.prefix: the launcher runs with -S, where the venv is not applied to sys.prefix
    h = lean.sha256(f"{sys.executable}\0{package}".encode())
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{name}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    return h.hexdigest()


def socket_path(containerd_address: str, directory: str = SOCKET_DIR) -> str:
    """One template per containerd (its -address) and per installed version, in the
    directory of the shims' sockets (containerd 2.3 may name another one)."""
    digest = lean.sha256_hex(f"{fingerprint()}\0{containerd_address}".encode())[:32]
    return os.path.join(directory, f"py-template-{digest}")


# -- launcher side --------------------------------------------------------------


def request_fork(path: str, config: ShimConfig, listener: _socket.socket) -> tuple[int | None, bool]:
    """Ask the template at path to fork a shim.

    Returns (shim pid or None to fall back, whether a usable template is there).
    Two phases, so a template that answers late can never leave a second shim
    on the socket: the request carries the read end of a "go" pipe, and the
    forked shim serves only once it reads "go", which is written here after
    the pid arrived in time. Falling back just closes the pipe: a shim forked
    meanwhile reads EOF and exits. A template that does not answer within
    REQUEST_TIMEOUT, or is stopped, is retired (killed by its pid) so the
    caller starts a new one, and no later start waits on it.
    """
    deadline = time.monotonic() + REQUEST_TIMEOUT
    request = repr({"config": config.encode(), "env": dict(os.environ), "deadline": deadline}).encode()
    conn = lean.unix_socket(lean.SOCK_SEQPACKET)
    go_r, go_w = os.pipe()
    try:
        try:
            conn.settimeout(max(REQUEST_TIMEOUT, ANSWER_POLL))
            conn.connect(path)
            lean.send_fds(conn, request, [listener.fileno(), go_r])
        except OSError:
            return None, False
        os.close(go_r)
        go_r = -1
        answer = _answer(conn, path, deadline + ANSWER_MARGIN)
        if answer is None:
            _retire(path)
            return None, False
        pid = int(answer) if answer.isdigit() else 0  # anything else: the template refused
        if pid > 0:
            os.write(go_w, GO)
        return (pid if pid > 0 else None), True
    finally:
        conn.close()
        os.close(go_w)
        if go_r >= 0:
            os.close(go_r)


def _answer(conn: _socket.socket, path: str, deadline: float) -> bytes | None:
    """The template's answer, or None if it does not come before deadline or the template is stopped."""
    conn.settimeout(ANSWER_POLL)
    while True:
        try:
            return conn.recv(64)
        except TimeoutError:
            if time.monotonic() > deadline or _stopped(_template_pid(path)):
                return None
        except OSError:
            return b""


def _template_pid(path: str) -> int:
    """The template's pid from its pid file, if that process is the template of path."""
    try:
        with open(path + ".pid") as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if path.encode() in f.read() else 0
    except (OSError, ValueError):
        return 0


def _stopped(pid: int) -> bool:
    """SIGSTOPped or traced (it answers nobody until someone resumes it)."""
    return bool(pid) and lean.process_state(pid) in (b"T", b"t")


def _retire(path: str) -> None:
    """Kill an unresponsive template (checked by pid and argv) and free its socket name."""
    pid = _template_pid(path)
    if pid:
        try:
            os.kill(pid, 9)  # SIGKILL (importing signal costs the launcher ~4 ms)
        except OSError:
            pass
    try:
        os.unlink(path)
    except OSError:
        pass


def spawn_template(path: str) -> None:
    """Start a template in the background for the next start (not waited for)."""
    import subprocess

    log = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", MAIN, path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,  # the template's log: what went wrong, kept while it is not empty
            cwd="/",
            start_new_session=True,
        )
    finally:
        os.close(log)
    proc.returncode = 0  # it outlives us


# -- template side ---------------------------------------------------------------


def _peer_uid(conn: socket.socket) -> int:
    import socket
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[2]
    return uid


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
        from .daemon import main

        code = main(config)
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


def _serve_one(conn: socket.socket) -> None:
    import ast
    import socket

    conn.settimeout(CONNECTION_TIMEOUT)  # one idle client must not hold up every start
    if _peer_uid(conn) != os.getuid():
        return
    message, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 2)
    try:
        if len(fds) != 2:
            return
        request = ast.literal_eval(message.decode())
        if not isinstance(request, dict):
            return
        if time.monotonic() > request["deadline"]:
            conn.send(b"late")
            return  # the launcher has fallen back (or is about to)
        pid = fork_shim(ShimConfig.decode(request["config"]), request["env"], fds[0], fds[1])
        conn.send(str(pid).encode())
    finally:
        for fd in fds:
            os.close(fd)


def _warm_up() -> None:
    """Import and initialise everything a shim uses, so children share it."""
    import setproctitle  # noqa: F401

    from . import daemon  # noqa: F401  (pulls in the whole shim)
    from .warmup import warm_up

    warm_up()
    gc.collect()
    immortalize_heap()
    fill_partial_pools()  # last: anything allocated and freed after it would leave holes again
    gc.freeze()


def immortalize_heap() -> int:
    """Make every object reachable in the template immortal before forking.

    CPython 3.12+ (PEP 683) skips reference-count writes on immortal objects.
    Without this, a forked shim dirties (copies) every template page holding
    an object it merely touches; with it, those pages stay shared. Measured
    on 3.13: a forked shim serving a container holds ~3.7 MiB private instead
    of ~6.2 MiB. No public API marks objects immortal, so the refcount is set
    to the immortal value directly, after a self-check that this CPython
    treats it as such. Objects made immortal are never freed: fine for what
    the template built to share. Returns how many objects were marked (0 when
    the interpreter is older or behaves differently).
    """
    if not _immortal_refcounts_work():
        return 0
    import ctypes

    seen: set[int] = set()
    stack = gc.get_objects()
    while stack:
        obj = stack.pop()
        address = id(obj)
        if address in seen:
            continue
        seen.add(address)
        ctypes.c_ssize_t.from_address(address).value = _IMMORTAL
        stack.extend(gc.get_referents(obj))
    return len(seen)


_IMMORTAL = 0xFFFFFFFF  # _Py_IMMORTAL_REFCNT on 64-bit CPython 3.12/3.13


def _immortal_refcounts_work() -> bool:
    """True if an object given the immortal refcount keeps it through incref/decref."""
    if sys.version_info < (3, 12) or sys.maxsize < 2**32:
        return False
    import ctypes

    probe = [object()]
    cell = ctypes.c_ssize_t.from_address(id(probe))
    before = cell.value
    cell.value = _IMMORTAL
    alias = probe  # an incref
    del alias  # a decref
    unchanged = cell.value == _IMMORTAL and sys.getrefcount(probe) == _IMMORTAL
    if not unchanged:
        cell.value = before
    return unchanged


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(0)  # unwinds through main's cleanup


def main() -> None:
    import signal

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
        sock.settimeout(IDLE_TIMEOUT)
        while True:
            try:
                conn, _ = sock.accept()
            except TimeoutError:  # idle for IDLE_TIMEOUT
                break
            with conn:
                try:
                    _serve_one(conn)
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


def _malloc_stats() -> list[tuple[int, int]]:
    """(block size, free blocks in partly used pools) per obmalloc size class.

    Read from ``sys._debugmallocstats()``, which writes to the C-level stderr;
    empty when the output cannot be read (another allocator, another format).
    """
    import tempfile

    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        parts = line.split()  # class, size, pools, blocks in use, available blocks
        if len(parts) == 5 and all(p.isdigit() for p in parts):
            out.append((int(parts[1]), int(parts[4])))
    return out


#: What fill_partial_pools allocated: kept for the template's life (and so shared by every shim).
_FILLER: list[object] = []


def fill_partial_pools() -> int:
    """Occupy the free blocks of the template's partly used obmalloc pools.

    A forked shim's new small objects would otherwise land in those free
    slots, spread over hundreds of template pages, each of which the first
    write copies into the shim. Filled, they go to fresh pools: pages of the
    shim's own, packed. Measured on 3.13: ~0.2 MiB less private memory per
    shim. Returns how many blocks were filled.
    """
    stats = _malloc_stats()
    sizes = dict(stats)
    filled = sum(avail for size, avail in stats if size >= 48) + sizes.get(32, 0)
    keep: list[object] = [None] * filled
    i = 0
    for size, avail in stats:
        if size < 48:
            continue
        for _ in range(avail):
            keep[i] = bytes(size - 33)  # a bytes object of length n takes 33 + n bytes
            i += 1
    for n in range(sizes.get(32, 0)):
        keep[i] = (1 << 40) + n  # an int of this size takes 28: the 32-byte class
        i += 1
    _FILLER.append(keep)
    return filled
