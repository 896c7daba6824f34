"""The launcher's side of the warm template: find it, ask it for a shim, start one.

The template (shim/template/server.py) is one pre-imported process per
containerd that forks shims; see its docstring for why. This half runs in the
per-start launcher, so it is standard library only; the protocol both halves
speak is defined here: a SOCK_SEQPACKET request (a Python literal: the shim's
config, environment and a deadline) carrying two fds (the shim's listener and
the read end of a "go" pipe), answered with the forked shim's pid.

Correctness never depends on the template. The launcher falls back to
spawning a shim itself when the template is missing, refuses, or does not
answer before the request's deadline; the template refuses any request whose
deadline has passed, so the two can never both start a shim for one socket.
A template whose code changed on disk since it started answers ``stale`` and
exits, so an upgrade gets a new template.

``start-relay`` (start_relay.c) is this module's other client: it sends the
template a whole ``start`` (a ``launch`` request: arguments, environment,
working directory, containerd's pid and THP setting, and the stdio fds), and
the template runs the launcher in a forked child, with no interpreter to start.
"""

from __future__ import annotations

import os
import sys
import time

from shim.common import lean
from shim.common.config import SOCKET_DIR, ShimConfig

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import _socket
    from collections.abc import Mapping

ENV_DISABLE = "SHIM_PY_TEMPLATE"  # "0": never use or start a template
#: The template refuses a request it reads later than this. A template still warming up
#: (imports, then ~0.4 s of warm-up) reads the requests queued meanwhile when it is done:
#: with 1.0 s, under load (4 concurrent starts on 2 cores) such a request was refused and
#: its start spawned a shim of its own (~18 MiB for the task's life, against ~2.5 forked).
#: A hung template costs one start this long, then it is retired.
REQUEST_TIMEOUT = 3.0
ANSWER_MARGIN = 0.5  # the launcher waits REQUEST_TIMEOUT plus this for the pid
ANSWER_POLL = 0.05  # how often a waiting launcher checks that the template is not stopped
GO = b"go"  # the launcher's word to a forked shim that it may serve
STALE = b"stale"  # the template's answer when the code on disk changed since it started
READY_WAIT = 2.0  # how long a start that launched the template waits for it to listen
READY_POLL = 0.01
WANTED_WITHIN = 600.0  # a second start this soon after a first launches a template (its idle timeout)
#: The template's entry point (nothing else imports shim.template: see shim/template).
MAIN = "from shim.template.server import main; main()"


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(ENV_DISABLE, "1") != "0"


def package_dir() -> str:
    """The shim package's directory (shim/, not shim/launch/), symlinks resolved."""
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def fingerprint() -> str:
    """Which code a template runs: the interpreter, the package path and its files' mtimes.

    The template computes it when it starts and again for a request after its inotify
    watch saw the package change (a walk over the package's files, ~0.4 ms in a warm
    process, so not for every request: shim.template.server.CodeWatch): code that changed since
    gets the answer ``stale`` and the template exits, so an upgrade or an edit is
    never served by old code, while the socket's name stays one a ``start-relay``
    (C, no hashing library) can compute."""
    package = package_dir()
    # sys.executable, not sys.prefix: the launcher runs with -S, where the venv is not applied to sys.prefix
    h = lean.sha256(f"{sys.executable}\0{package}".encode())
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{name}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    return h.hexdigest()


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: the socket key start_relay.c computes the same way."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def socket_path(containerd_address: str, directory: str = SOCKET_DIR, python: str = "") -> str:
    """One template per interpreter (so per installation: each has its venv) and per
    containerd (its -address), in the directory of the shims' sockets (containerd 2.3
    may name another one)."""
    key = fnv1a64(f"{python or sys.executable}\0{containerd_address}".encode())
    return os.path.join(directory, f"py-template-{key:016x}")


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
        # a stale template has exited: start a new one
        return (pid if pid > 0 else None), answer != STALE
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
            os.kill(pid, lean.SIGKILL)
        except OSError:
            pass
    try:
        os.unlink(path)
    except OSError:
        pass


def wanted(path: str, now: float | None = None) -> bool:
    """Whether a start that found no template should launch one: only the second within WANTED_WITHIN.

    A template costs its whole heap (~30 MiB Pss) and saves ~15 MiB per forked
    shim against a spawned one, so with one task it only costs: the first
    start leaves ``<path>.wanted`` and spawns its shim alone; a second start
    while that mark is fresh launches the template, which later starts fork
    from; so does any start before the template listens (the mark stays: a
    template started twice keeps one, the other exits). An old mark (made as
    long ago as a template idles before it exits, so none can still run from
    it) counts as a first start again. A template that died
    or was retired (its pid file is left: only a clean exit removes it) was
    wanted, so its successor starts at once.
    """
    if os.path.exists(path + ".pid"):
        return True
    mark = path + ".wanted"
    now = time.time() if now is None else now
    try:
        age: float | None = now - os.stat(mark).st_mtime
    except OSError:
        age = None
    fresh = age is not None and age <= WANTED_WITHIN
    if fresh:  # the mark stays: a third start before the template listens is no first start either
        return True
    # A first start. Exclusively: two first starts at once (containerd starts tasks
    # concurrently) would otherwise both find no mark and each spawn a shim (~18 MiB each).
    if age is not None:
        try:
            os.unlink(mark)  # an old one
        except OSError:
            pass
    try:
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return True  # another start marked it since we looked: this one is the second
    except OSError:
        return True  # cannot keep the mark: never starting a template would cost more
    os.close(fd)
    try:
        os.utime(mark, (now, now))
    except OSError:
        pass
    return False


def spawn_template(path: str) -> bool:
    """Start a template in the background (not waited for), once one is wanted: on the
    second start that found none (see wanted). True if one was started."""
    if not wanted(path):
        return False
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
    return True


def fork_when_ready(path: str, config: ShimConfig, listener: _socket.socket, wait: float = READY_WAIT) -> int | None:
    """Ask a template that was just spawned for the shim, as soon as it listens (its socket
    is bound ~50 ms after the spawn; a request made while it warms up is answered when it
    is done, ~0.3 s). A start that launched the template pays that once rather than a
    spawned shim's ~20 MiB for the shim's whole life. None: spawn after all."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if os.path.exists(path):
            pid, there = request_fork(path, config, listener)
            if pid is not None or there:
                return pid
        time.sleep(READY_POLL)
    return None
