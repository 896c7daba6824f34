"""The template's fork path (shim.template.server, shim.launch.template_client), for real: fork_shim in this process, and a whole template
process serving request_fork on a socket in tmp_path (no root, no containerd, no runc).

The only stand-in is the shim's body: ``shim.daemon.main`` is replaced by FAKE_MAIN,
which reports what the forked shim looks like from inside (pid, session, fds,
environment, cwd, signals, title) into ``<bundle>/report.json`` and returns. Every
process started here is ended by its pid; forked shims end by themselves.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim.common import lean
from shim.common.config import LISTEN_FD, ShimConfig
from shim.common.record import as_dict
from shim.launch import template_client
from shim.template import server as template_server

ROOT = Path(__file__).resolve().parent.parent
EVENTUALLY = 30.0

def fake_main(config: ShimConfig) -> int:
    """The forked shim's body in these tests (the template process gets its source): report, return."""
    import json
    import os
    import signal
    import traceback

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False

    with open("/proc/self/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    if len(argv) == 1:
        argv = argv[0].split()
    report = {
        "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
        "fds": sorted(fd for fd in map(int, os.listdir("/proc/self/fd")) if is_open(fd)),
        "stdio": [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)],
        "fd3_inode": os.fstat(3).st_ino, "env": dict(os.environ), "cwd": os.getcwd(),
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "argv": argv, "config": config.encode(),
        "stack": [frame.f_code.co_qualname for frame, _ in traceback.walk_stack(None)],
    }
    path = os.path.join(config.bundle, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(path + ".tmp", path)
    return 0


FAKE_MAIN = inspect.getsource(fake_main)


def wait_for(predicate, timeout: float = EVENTUALLY, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's new parent may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def read_report(bundle: Path) -> dict:
    path = bundle / "report.json"
    wait_for(path.exists, what=f"the forked shim's report in {bundle}")
    return json.loads(path.read_text())


def make_config(tmp_path: Path, id: str) -> ShimConfig:
    bundle = tmp_path / id
    bundle.mkdir()
    return ShimConfig(namespace="ns1", id=id, bundle=str(bundle), address="/run/test-containerd.sock",
                      ttrpc_address="/run/test-containerd.sock.ttrpc", socket_path=str(tmp_path / f"{id}.sock"))


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


# -- fork_shim in this process --------------------------------------------------------------

def test_fork_shim_gives_an_orphan_that_is_only_the_shim(tmp_path: Path, monkeypatch) -> None:
    import shim.daemon.main

    monkeypatch.setattr(shim.daemon.main, "main", fake_main)
    config = make_config(tmp_path, "c1")
    listener = listening_socket(Path(config.socket_path))
    assert listener.fileno() != LISTEN_FD  # so the dup2 onto fd 3 is exercised
    stray = os.open(tmp_path / "stray", os.O_CREAT | os.O_RDWR)  # a template fd: must not reach the shim
    os.set_inheritable(stray, True)
    env = {"TTRPC_ADDRESS": config.ttrpc_address, "ONLY": "this"}
    # the template exits on SIGTERM through a handler; the shim must get the default back
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        pid = template_server.fork_shim(config, env, listener.fileno())
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(stray)
    report = read_report(Path(config.bundle))
    listener_inode = os.fstat(listener.fileno()).st_ino
    listener.close()

    assert pid > 0 and report["pid"] == pid
    # never our child: a template crash touches no shim, and we have nothing to reap
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert report["ppid"] != os.getpid()
    # fork, setsid, fork: in the session the middle process led, which fork_shim reaped
    middle = report["sid"]
    assert middle not in (pid, os.getpid(), os.getsid(0))
    assert report["pgid"] == middle
    with pytest.raises(ChildProcessError):
        os.waitpid(middle, os.WNOHANG)
    # only stdio and the listener, on fd 3
    assert report["fds"] == [0, 1, 2, 3]
    assert report["fd3_inode"] == listener_inode
    assert report["env"] == env
    assert report["cwd"] == config.bundle
    assert report["sigterm_default"] is True
    assert ShimConfig.decode(report["config"]) == config
    # as ps shows the Go shim: its binary's name and flags
    assert report["argv"] == ["containerd-shim-runc-v2-py", "-namespace", "ns1", "-id", "c1",
                              "-address", "/run/test-containerd.sock"]
    wait_for(lambda: not alive(pid), what=f"forked shim {pid} to exit after main returned")


def request_fork(path: Path, config: ShimConfig) -> tuple[int | None, bool]:
    """template_client.request_fork as the launcher calls it, with a listener made and closed here."""
    listener = listening_socket(Path(config.socket_path))
    try:
        return template_client.request_fork(str(path), config, listener)
    finally:
        listener.close()


# -- a template process -------------------------------------------------------------------------

def start_template(path: Path, root: Path = ROOT, prelude: str = "") -> subprocess.Popen:
    """``python -c MAIN path`` as spawn_template runs it, with the shim's body replaced
    (and prelude, more Python, run before MAIN)."""
    program = (
        "from __future__ import annotations\n"  # fake_main's annotation names a class not imported there
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        f"{FAKE_MAIN}\n"
        "import shim.daemon.main; shim.daemon.main.main = fake_main\n"
        f"{prelude}\n"
        f"{template_client.MAIN}\n"
    )
    return subprocess.Popen([sys.executable, "-I", "-c", program, str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=EVENTUALLY)


@pytest.fixture
def running_template(tmp_path: Path, monkeypatch):
    """A template at tmp_path/tpl.sock, serving; requests get a deadline generous enough for a loaded machine."""
    monkeypatch.setattr(template_client, "REQUEST_TIMEOUT", EVENTUALLY)
    path = tmp_path / "tpl.sock"
    proc = start_template(path)
    try:
        def listening() -> bool:
            assert proc.poll() is None, f"the template exited: {proc.communicate()[1].decode()}"
            return Path(f"{path}.pid").exists() and lean.accepts(str(path), lean.SOCK_SEQPACKET)

        wait_for(listening, what="the template to listen")
        assert int(Path(f"{path}.pid").read_text()) == proc.pid
        yield proc, path
    finally:
        stop(proc)


def test_request_fork_starts_a_shim_from_the_template(running_template, tmp_path: Path) -> None:
    proc, path = running_template
    config = make_config(tmp_path, "c2")
    listener = listening_socket(Path(config.socket_path))
    try:
        pid, there = template_client.request_fork(str(path), config, listener)
        inode = os.fstat(listener.fileno()).st_ino
    finally:
        listener.close()
    assert there is True and pid is not None and pid > 0
    report = read_report(Path(config.bundle))
    assert report["pid"] == pid
    assert report["fd3_inode"] == inode  # the listener went over SCM_RIGHTS and landed on fd 3
    assert report["fds"] == [0, 1, 2, 3]
    assert report["env"] == dict(os.environ)  # the launcher's environment, not the template's
    assert report["cwd"] == config.bundle
    assert ShimConfig.decode(report["config"]) == config
    assert report["ppid"] != proc.pid and report["sid"] != os.getsid(proc.pid)  # not the template's
    assert proc.poll() is None  # the template goes on serving
    wait_for(lambda: not alive(pid), what=f"forked shim {pid} to exit")

    # and again: one template serves every start
    again = make_config(tmp_path, "c3")
    pid2, _ = request_fork(path, again)
    assert pid2 not in (None, pid)
    assert read_report(Path(again.bundle))["pid"] == pid2


def test_a_late_request_is_refused_and_forks_nothing(running_template, tmp_path: Path, monkeypatch) -> None:
    proc, path = running_template
    late = make_config(tmp_path, "late")
    listener = listening_socket(Path(late.socket_path))
    monkeypatch.setattr(template_client, "REQUEST_TIMEOUT", -1.0)  # the deadline has passed when it arrives
    monkeypatch.setattr(template_client, "ANSWER_MARGIN", EVENTUALLY + 1.0)  # ... but we wait for the answer
    try:
        assert template_client.request_fork(str(path), late, listener) == (None, True)  # there, and refusing
    finally:
        listener.close()
    # the template answers in order: once a later request's shim has reported, a shim
    # forked for the late one would have been forked before it
    monkeypatch.setattr(template_client, "REQUEST_TIMEOUT", EVENTUALLY)
    monkeypatch.setattr(template_client, "ANSWER_MARGIN", 1.0)
    later = make_config(tmp_path, "later")
    pid, _ = request_fork(path, later)
    assert read_report(Path(later.bundle))["pid"] == pid
    assert not (Path(late.bundle) / "report.json").exists()
    assert proc.poll() is None


@pytest.mark.parametrize("message", [b"[1, 2]", b"{'deadline': 'soon'}", b"{}", b"\xff\xfe", b"(", b"None"])
def test_a_malformed_request_leaves_the_template_serving(running_template, tmp_path: Path, message: bytes) -> None:
    proc, path = running_template
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        conn.connect(str(path))
        socket.send_fds(conn, [message], [r])
        conn.settimeout(EVENTUALLY)
        assert conn.recv(64) == b""  # closed unanswered
    finally:
        conn.close()
        os.close(r)
        os.close(w)
    assert proc.poll() is None
    config = make_config(tmp_path, "after-bad")
    pid, there = request_fork(path, config)
    assert there and read_report(Path(config.bundle))["pid"] == pid


def test_a_fork_the_launcher_gave_up_on_never_serves(running_template, tmp_path: Path) -> None:
    """Two-phase handoff: the forked shim waits for the launcher's "go"; a launcher that fell
    back closes the pipe instead, and the shim exits without ever running (no second shim)."""
    proc, path = running_template
    config = make_config(tmp_path, "abandoned")
    listener = listening_socket(Path(config.socket_path))
    go_r, go_w = os.pipe()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(str(path))
        request = repr({"config": config.encode(), "env": dict(os.environ), "deadline": time.monotonic() + EVENTUALLY})
        socket.send_fds(conn, [request.encode()], [listener.fileno(), go_r])
        os.close(go_r)
        conn.settimeout(EVENTUALLY)
        pid = int(conn.recv(64))
        assert pid > 0
        os.close(go_w)  # the launcher gave up: no "go"
        wait_for(lambda: not alive(pid), what=f"the abandoned shim {pid} to exit")
    finally:
        conn.close()
        listener.close()
    assert not (Path(config.bundle) / "report.json").exists()  # its main never ran
    assert proc.poll() is None


def test_a_stopped_template_is_retired_and_the_launcher_falls_back(running_template, tmp_path: Path) -> None:
    proc, path = running_template
    os.kill(proc.pid, signal.SIGSTOP)
    config = make_config(tmp_path, "while-stopped")
    assert request_fork(path, config) == (None, False)  # start another
    assert proc.wait(timeout=EVENTUALLY) == -signal.SIGKILL
    assert not path.exists()  # its name is free for a new template
    assert not (Path(config.bundle) / "report.json").exists()


def test_only_one_template_per_socket(running_template, tmp_path: Path) -> None:
    proc, path = running_template
    second = start_template(path)
    try:
        assert second.wait(timeout=EVENTUALLY) == 0  # the lock is taken: it leaves at once
    finally:
        stop(second)
    assert proc.poll() is None
    assert int(Path(f"{path}.pid").read_text()) == proc.pid
    # the first still owns and serves the socket
    config = make_config(tmp_path, "c4")
    pid, there = request_fork(path, config)
    assert there and read_report(Path(config.bundle))["pid"] == pid


def test_sigterm_ends_the_template_and_removes_its_files(running_template, tmp_path: Path) -> None:
    proc, path = running_template
    # warm and serving first: a SIGTERM that lands inside the warm-up can be lost (the
    # SystemExit its handler raises is swallowed when it fires in a weakref callback)
    config = make_config(tmp_path, "c6")
    pid, _ = request_fork(path, config)
    assert read_report(Path(config.bundle))["pid"] == pid
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=EVENTUALLY) == 0
    for leftover in (path, Path(f"{path}.pid"), Path(f"{path}.lock")):
        assert not leftover.exists(), leftover


def test_sigterm_during_warm_up_still_ends_the_template(tmp_path: Path) -> None:
    """The pid file is written just before the warm-up: a SIGTERM then is held, not lost."""
    path = tmp_path / "tpl.sock"
    proc = start_template(path)
    try:
        wait_for(lambda: Path(f"{path}.pid").exists() or proc.poll() is not None, what="the template's pid file")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=EVENTUALLY) == 0
    finally:
        stop(proc)
    for leftover in (path, Path(f"{path}.pid"), Path(f"{path}.lock")):
        assert not leftover.exists(), leftover


def test_no_template_means_fall_back(tmp_path: Path) -> None:
    config = make_config(tmp_path, "c5")
    listener = listening_socket(Path(config.socket_path))
    try:
        assert template_client.request_fork(str(tmp_path / "nobody.sock"), config, listener) == (None, False)
        # a socket file nobody listens on (a dead template's) is the same
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dead.bind(str(tmp_path / "dead.sock"))
        dead.close()
        assert template_client.request_fork(str(tmp_path / "dead.sock"), config, listener) == (None, False)
    finally:
        listener.close()
    assert not (Path(config.bundle) / "report.json").exists()


def test_config_survives_the_request_encoding() -> None:
    """What request_fork puts on the wire is a literal the template decodes with ast, not eval."""
    config = ShimConfig(namespace="n'\"s", id="c\\1", bundle="/b ü", address="/a", debug=True, thp_original=1)
    request = repr({"config": config.encode(), "env": {"K": "v'\""}, "deadline": 1.5})
    decoded = ast.literal_eval(request)
    assert ShimConfig.decode(decoded["config"]) == config
    assert as_dict(ShimConfig.decode(decoded["config"])) == as_dict(config)
    assert decoded["env"] == {"K": "v'\""}


def test_enabled() -> None:
    assert template_client.enabled({}) is True
    assert template_client.enabled({template_client.ENV_DISABLE: "1"}) is True
    assert template_client.enabled({template_client.ENV_DISABLE: "0"}) is False


def test_fingerprint_follows_the_code(tmp_path: Path, monkeypatch) -> None:
    """A changed source file means another fingerprint: a template serving old code says so."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    (package / "__pycache__").mkdir()
    monkeypatch.setattr(template_client, "__file__", str(package / "launch" / "template_client.py"))
    first = template_client.fingerprint()
    assert template_client.fingerprint() == first
    (package / "__pycache__" / "a.cpython.pyc").write_bytes(b"ignored")  # caches do not count
    assert template_client.fingerprint() == first
    os.utime(package / "a.py", ns=(1, 1))
    second = template_client.fingerprint()
    assert second != first
    (package / "b.py").write_text("")
    assert template_client.fingerprint() != second
    assert template_client.socket_path("/run/c.sock") != template_client.socket_path("/run/d.sock")


def test_a_failed_fork_closes_its_pipe(monkeypatch, tmp_path: Path) -> None:
    """fork(2) can fail (EAGAIN under a pids limit): the template must not leak the pipe it
    made for the shim's pid, or a template under pressure runs out of fds."""
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(template_server.os, "fork", no_fork)
    with pytest.raises(BlockingIOError):
        template_server.fork_shim(make_config(tmp_path, "nofork"), {}, 0)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_template_lives_in_the_shims_socket_directory(tmp_path: Path) -> None:
    """containerd 2.3 may give the shims another socket directory: the template goes there too."""
    assert template_client.socket_path("/run/c.sock", str(tmp_path)).startswith(f"{tmp_path}/py-template-")
    log = tmp_path / "t.log"
    log.write_text("")
    template_server._remove_if_empty(str(log))
    assert not log.exists()
    log.write_text("something went wrong\n")
    template_server._remove_if_empty(str(log))
    assert log.exists()  # kept for whoever looks into it


def test_a_template_whose_code_changed_answers_stale_and_exits(tmp_path: Path) -> None:
    """An upgrade (or an edit) is never served by a template holding the old code: it answers
    STALE, forks nothing and exits, freeing its name; the launcher then starts a new one."""
    root = tmp_path / "root"
    shutil.copytree(ROOT / "shim", root / "shim", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "tpl.sock"
    proc = start_template(path, root)
    try:
        wait_for(lambda: lean.accepts(str(path), lean.SOCK_SEQPACKET), what="the template to listen")
        fresh = make_config(tmp_path, "fresh")
        pid, there = request_fork(path, fresh)
        assert there and read_report(Path(fresh.bundle))["pid"] == pid
        os.utime(root / "shim" / "daemon" / "service.py", ns=(1, 1))  # the code on disk changed
        stale = make_config(tmp_path, "stale")
        assert request_fork(path, stale) == (None, False)  # not there any more: start a new one
        assert proc.wait(timeout=EVENTUALLY) == 0
        assert not path.exists()
        assert not (Path(stale.bundle) / "report.json").exists()
    finally:
        stop(proc)


def test_a_start_that_launched_the_template_is_forked_from_it(tmp_path: Path, monkeypatch) -> None:
    """The start that launches the template waits for it instead of spawning a shim of ~20 MiB
    that would live as long as its task: right after the spawn the socket is not even there."""
    monkeypatch.setattr(template_client, "REQUEST_TIMEOUT", EVENTUALLY)
    path = tmp_path / "tpl.sock"
    proc = start_template(path)
    config = make_config(tmp_path, "launched")
    listener = listening_socket(Path(config.socket_path))
    try:
        pid = template_client.fork_when_ready(str(path), config, listener, wait=EVENTUALLY)
        assert pid is not None
        assert read_report(Path(config.bundle))["pid"] == pid
    finally:
        listener.close()
        stop(proc)


def test_no_template_coming_means_spawn_after_the_wait(tmp_path: Path) -> None:
    config = make_config(tmp_path, "never")
    listener = listening_socket(Path(config.socket_path))
    try:
        assert template_client.fork_when_ready(str(tmp_path / "none.sock"), config, listener, wait=0.1) is None
    finally:
        listener.close()


def test_the_code_watch_sees_every_kind_of_change_and_is_quiet_otherwise(tmp_path: Path) -> None:
    """The template skips the fingerprint walk only while its inotify watch saw nothing: an edit,
    a touch, a new file, a removal, a rename, and an edit in a directory created after the watch
    began each make it walk again (then it is quiet until the next change)."""
    pkg = tmp_path / "shim"
    (pkg / "daemon").mkdir(parents=True)
    (pkg / "daemon" / "service.py").write_text("x = 1\n")
    watch = template_server.CodeWatch(str(pkg))
    try:
        assert watch.fd >= 0 and watch.quiet()
        (pkg / "__pycache__").mkdir()  # not the code, but a walk says so
        assert not watch.quiet() and watch.quiet()
        (pkg / "__pycache__" / "service.cpython-313.pyc").write_bytes(b"")
        assert watch.quiet()  # bytecode caches are not watched
        changes = [
            lambda: (pkg / "daemon" / "service.py").write_text("x = 2\n"),
            lambda: os.utime(pkg / "daemon" / "service.py", ns=(1, 1)),
            lambda: (pkg / "daemon" / "new.py").write_text(""),
            lambda: (pkg / "daemon" / "new.py").rename(pkg / "daemon" / "newer.py"),
            lambda: (pkg / "daemon" / "newer.py").unlink(),
            lambda: (pkg / "sub").mkdir(),
            lambda: (pkg / "sub" / "mod.py").write_text(""),  # watched since the mkdir's walk
            lambda: os.utime(pkg / "sub" / "mod.py", ns=(1, 1)),
        ]
        for i, change in enumerate(changes):
            change()
            assert not watch.quiet(), i
            assert watch.quiet(), i
    finally:
        os.close(watch.fd)


def test_a_request_queued_while_the_template_warms_up_for_over_a_second_is_forked(tmp_path: Path) -> None:
    """The default deadline outlasts a slow warm-up: the start is forked, not refused (and spawned)."""
    path = tmp_path / "tpl.sock"
    slow = ("import time, shim.template.server as s\n"
            "warm_up = s._warm_up\n"
            "def slow_warm_up() -> None:\n"
            "    time.sleep(1.2)  # a loaded machine's warm-up\n"
            "    warm_up()\n"
            "s._warm_up = slow_warm_up\n")
    proc = start_template(path, prelude=slow)
    try:
        wait_for(lambda: path.exists(), what="the template to bind (it warms up after)")
        config = make_config(tmp_path, "queued")
        pid, there = request_fork(path, config)
        assert there is True and pid is not None and pid > 0
        assert read_report(Path(config.bundle))["pid"] == pid
    finally:
        stop(proc)
