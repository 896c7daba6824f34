"""shim.common.lean: the standard-library shortcuts of the start/delete paths, checked against
what they stand in for (hashlib, socket) on real unix sockets in tmp_path (no root)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shim.common import lean

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("data", [b"", b"abc", b"/run/c.sock/k8s.io/pod", bytes(range(256)) * 300])
def test_sha256_matches_hashlib(data: bytes) -> None:
    assert lean.sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    assert lean.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    h = lean.sha256(data)
    h.update(b"more")  # incremental use, as template.fingerprint does
    assert h.hexdigest() == hashlib.sha256(data + b"more").hexdigest()


def test_unix_socket_is_what_socket_module_makes() -> None:
    for kind in (lean.SOCK_STREAM, lean.SOCK_SEQPACKET):
        s = lean.unix_socket(kind)
        ref = socket.socket(socket.AF_UNIX, kind)
        try:
            assert (s.family, s.type) == (ref.family, ref.type) == (socket.AF_UNIX, kind)
            # close-on-exec: nothing the launcher or template spawns inherits it
            assert os.get_inheritable(s.fileno()) is False
            assert os.get_inheritable(ref.fileno()) is False
        finally:
            s.close()
            ref.close()
    assert lean.unix_socket().type == socket.SOCK_STREAM  # the default


def test_constants_match_socket_module() -> None:
    assert (lean.AF_UNIX, lean.SOCK_STREAM, lean.SOCK_SEQPACKET) == (
        socket.AF_UNIX, socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


def test_accepts(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    assert lean.accepts(path) is False  # nothing there
    (tmp_path / "plain").write_text("x")
    assert lean.accepts(str(tmp_path / "plain")) is False  # not a socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    try:
        assert lean.accepts(path) is False  # bound, not listening: a dead shim's leftover looks so
        listener.listen(1)
        assert lean.accepts(path) is True
        assert lean.accepts(path, lean.SOCK_SEQPACKET) is False  # wrong kind: EPROTOTYPE
    finally:
        listener.close()
    assert lean.accepts(path) is False  # the file is left, nobody listens: ECONNREFUSED

    seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seq_path = str(tmp_path / "t.sock")
    seq.bind(seq_path)
    seq.listen(1)
    try:
        assert lean.accepts(seq_path, lean.SOCK_SEQPACKET) is True  # the template's kind
        assert lean.accepts(seq_path) is False
    finally:
        seq.close()


def test_accepts_leaves_no_fd_behind(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(5):
            assert lean.accepts(path)
            assert not lean.accepts(path + ".missing")
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        listener.close()


def test_send_fds_passes_data_and_descriptors(tmp_path: Path) -> None:
    """What the launcher sends the template: one message, the listener as SCM_RIGHTS."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    f = tmp_path / "f"
    f.write_text("x")
    fd1 = os.open(f, os.O_RDONLY)
    r, w = os.pipe()
    try:
        lean.send_fds(a, b"request", [fd1, w])
        message, fds, _flags, _addr = socket.recv_fds(b, 1024, 4)
        try:
            assert message == b"request"
            assert len(fds) == 2
            got1, got_w = fds
            assert (os.fstat(got1).st_ino, os.fstat(got1).st_dev) == (os.fstat(fd1).st_ino, os.fstat(fd1).st_dev)
            os.write(got_w, b"through")  # the received fd is the pipe's write end
            assert os.read(r, 16) == b"through"
        finally:
            for fd in fds:
                os.close(fd)
        # send_fds with no descriptors is a plain message (what socket.send_fds does too)
        lean.send_fds(a, b"plain", [])
        assert socket.recv_fds(b, 1024, 1)[:2] == (b"plain", [])
    finally:
        for fd in (fd1, r, w):
            os.close(fd)
        a.close()
        b.close()


def test_lean_imports_neither_socket_nor_hashlib() -> None:
    """Its reason to exist: the start path must not pay for socket (selectors, enum) or hashlib."""
    probe = (
        "import sys; from shim.common import lean; "
        "lean.sha256_hex(b'x'); s = lean.unix_socket(); s.close(); lean.accepts('/nonexistent'); "
        "print(sorted(m for m in ('socket', 'hashlib', 'selectors', 'enum', '_hashlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {probe}"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_listener_with_a_full_backlog_is_alive(tmp_path) -> None:
    """A busy shim whose backlog is full must not be taken for a dead one (its socket would
    be removed and a second shim started), nor hang the probe."""
    import socket

    from shim.common import lean

    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        while True:  # fill the backlog (never accepted)
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        assert lean.accepts(path)
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert not lean.accepts(path)  # closed: refused, a dead leftover


def test_process_state_reads_the_letter_after_the_command_name() -> None:
    import os
    import subprocess

    from shim.common import lean

    assert lean.process_state(os.getpid()) in (b"R", b"S")
    child = subprocess.Popen(["sh", "-c", "exit 0"])
    while lean.process_state(child.pid) != b"Z":  # exited, not yet waited for: a zombie
        pass
    child.wait()
    assert lean.process_state(child.pid) == b""


def test_process_ending_is_false_for_a_live_process_and_true_from_exit_on() -> None:
    import os
    import subprocess

    from shim.common import lean

    assert not lean.process_ending(os.getpid())  # alive: no PF_EXITING in its flags
    assert int(lean.proc_stat(os.getpid())[6]) & lean.PF_EXITING == 0
    child = subprocess.Popen(["sh", "-c", "exit 0"])
    while lean.process_state(child.pid) != b"Z":  # exited, not yet waited for: a zombie
        pass
    assert lean.process_ending(child.pid)
    child.wait()
    assert lean.process_ending(child.pid)  # gone
    assert lean.proc_stat(child.pid) == []
