"""shim.launch.launcher: the socket address and binding it (no root: a tmp dir)."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from shim.common.config import SOCKET_DIR
from shim.launch.grouping import socket_path
from shim.launch.launcher import bind

ADDRESS = "/run/containerd/containerd.sock"


def test_socket_path_is_sha256_of_joined_address() -> None:
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/abc").hexdigest()
    assert socket_path(ADDRESS, "default", "abc") == f"/run/containerd/s/{digest}"
    assert SOCKET_DIR == "/run/containerd/s"


def test_socket_path_matches_os_path_join() -> None:
    path = socket_path(ADDRESS, "k8s.io", "group-1")
    expected = hashlib.sha256(os.path.join(ADDRESS, "k8s.io", "group-1").encode()).hexdigest()
    assert os.path.dirname(path) == SOCKET_DIR
    name = os.path.basename(path)
    assert name == expected
    assert len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def test_socket_path_fits_sun_path() -> None:
    long_id = "x" * 500
    path = socket_path(ADDRESS, "n" * 200, long_id)
    assert len(path) < 106
    assert len("unix://" + path) < 200


def test_socket_path_differs_per_namespace_and_id() -> None:
    paths = {
        socket_path(ADDRESS, "default", "a"),
        socket_path(ADDRESS, "default", "b"),
        socket_path(ADDRESS, "k8s.io", "a"),
        socket_path("/other.sock", "default", "a"),
    }
    assert len(paths) == 4
    assert socket_path(ADDRESS, "default", "a") == socket_path(ADDRESS, "default", "a")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "s" / "sock")  # "s" does not exist yet: bind creates it


def accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(path)
            return True
        except OSError:
            return False


def test_bind_creates_listening_socket_mode_0600(path: str) -> None:
    sock = bind(path)
    assert sock is not None
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert accepts(path)
    finally:
        sock.close()


def test_bind_returns_none_when_live_listener(path: str) -> None:
    first = bind(path)
    assert first is not None
    try:
        assert bind(path) is None
        # The live listener's socket file was left alone.
        assert accepts(path)
    finally:
        first.close()


def test_bind_replaces_stale_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    os.chmod(path, 0o644)
    assert os.path.exists(path) and not accepts(path)

    sock = bind(path)
    assert sock is not None
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert accepts(path)
    finally:
        sock.close()


def test_a_namespace_shim_is_spawned_without_any_template(monkeypatch: pytest.MonkeyPatch) -> None:
    """ShimGroup = "namespace": one shim per namespace, so a template would only cost memory."""
    from shim.common.config import ShimConfig
    from shim.launch import launcher
    from shim.launch import template_client as template

    def no_template(*_: object) -> None:
        raise AssertionError("the template was used")

    spawned: list[tuple[ShimConfig, bool]] = []
    monkeypatch.setattr(template, "request_fork", no_template)
    monkeypatch.setattr(template, "spawn_template", no_template)
    monkeypatch.setattr(launcher, "spawn", lambda config, sock, shared=False: spawned.append((config, shared)) or 4242)
    monkeypatch.delenv(template.ENV_DISABLE, raising=False)
    config = ShimConfig(namespace="ns", id="first", bundle="/b")
    assert launcher._start_shim(config, None, shared=True) == 4242  # type: ignore[arg-type]
    assert spawned == [(config, True)]
    with pytest.raises(AssertionError, match="template was used"):  # per-task shims still use it
        launcher._start_shim(config, None)  # type: ignore[arg-type]


def test_a_launcher_never_removes_a_socket_another_is_still_setting_up(tmp_path) -> None:
    """Between bind and listen a new shim's socket refuses connections; a concurrent launcher of
    the same group must wait (the bind lock), then join it, not remove it and start a second shim."""
    import fcntl
    import socket
    import threading

    from shim.launch import launcher

    path = str(tmp_path / "shim.sock")
    from shim.common import lean

    lock = os.open(str(tmp_path / lean.SOCKET_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # launcher A, mid-way: bound, not listening yet
    first = socket.socket(socket.AF_UNIX)
    first.bind(path)
    result: list[object] = []
    second = threading.Thread(target=lambda: result.append(launcher.bind(path)))
    second.start()
    try:
        second.join(timeout=0.5)
        assert second.is_alive() and not result  # launcher B waits for A
        first.listen(8)
        fcntl.flock(lock, fcntl.LOCK_UN)
        second.join(timeout=30)
        assert result == [None]  # B joins A's shim
        assert os.path.exists(path)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)  # and the socket on the path is still A's
        conn, _ = first.accept()
        conn.close()
        probe.close()
    finally:
        os.close(lock)
        first.close()
        if isinstance(result[:1] and result[0], socket.socket):
            result[0].close()


def test_the_shim_is_made_a_slightly_better_oom_victim_or_the_start_fails() -> None:
    import subprocess

    from shim.launch.launcher import _oom_score_above_parent

    with open(f"/proc/{os.getpid()}/oom_score_adj") as f:
        ours = int(f.read())
    child = subprocess.Popen(["sleep", "60"])
    try:
        _oom_score_above_parent(child.pid, parent=os.getpid())
        with open(f"/proc/{child.pid}/oom_score_adj") as f:
            assert int(f.read()) == min(ours + 1, 1000)
    finally:
        child.kill()
        child.wait()
    with pytest.raises(OSError):  # as Go's start: it cannot be set, no start
        _oom_score_above_parent(child.pid, parent=os.getpid())


@pytest.mark.parametrize("shared", [False, True])
def test_only_a_namespace_shim_runs_on_malloc(monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """A namespace shim's interpreter gets PYTHONMALLOC=malloc (so malloc_trim can give a burst's
    memory back) and no other PYTHON* variable; a per-task shim keeps -I and pymalloc."""
    import socket
    import subprocess

    from shim.common.config import CONFIG_ENV, LISTEN_FD, ShimConfig
    from shim.launch import launcher

    calls: list[tuple[list[str], dict[str, str]]] = []

    class Popen:
        def __init__(self, argv: list[str], env: dict[str, str], **_: object) -> None:
            calls.append((argv, env))
            self.pid = 4242

    monkeypatch.setattr(subprocess, "Popen", Popen)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("OTHER", "kept")
    saved = os.dup(LISTEN_FD) if _fd_open(LISTEN_FD) else None  # before the socket, which may take fd 3
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert launcher.spawn(ShimConfig(namespace="ns", id="t", bundle="/b"), sock, shared=shared) == 4242
    finally:
        sock.close()
        if saved is not None:
            os.dup2(saved, LISTEN_FD)
            os.close(saved)
        else:
            os.close(LISTEN_FD)
    [(argv, env)] = calls
    assert env["OTHER"] == "kept" and CONFIG_ENV in env
    if shared:
        assert env["PYTHONMALLOC"] == "malloc" and "PYTHONPATH" not in env
        assert "-I" not in argv and {"-s", "-P"} <= set(argv[1:3])
    else:
        assert "PYTHONMALLOC" not in env and argv[1] == "-I"


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
