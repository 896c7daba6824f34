"""start-relay (shim/launch/start_relay.c): a start handed to the warm template.

First the relay alone, against a fake template played by this test: what it
sends, the two phases, and every way it falls back to the Python launcher
(no template, a refusal, no answer, SHIM_PY_TEMPLATE=0) without anything
having been started. Then the relay with a real template process (its shim
body replaced, as in test_template_fork.py): the launcher runs inside the
template, forks a shim from it, and containerd's side sees the same output,
exit status and shim as from a launcher of its own.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_template_fork import alive, read_report, start_template, stop, wait_for

from shim.common import lean
from shim.common.config import ShimConfig
from shim.launch import template_client
from shim.launch.grouping import socket_path as shim_socket_path
from shim.template.server import LaunchRequest
from shim.thp import get_thp_disable

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "shim" / "launch" / "start-relay"
ADDRESS = "/run/test-relay-containerd.sock"
pytestmark = pytest.mark.skipif(not os.access(RELAY, os.X_OK), reason=f"{RELAY} not built (make venv builds it)")


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """What the relay execs when it falls back: prints its arguments."""
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\nprintf "fallback"; printf " %s" "$@"; echo\n')
    script.chmod(0o755)
    return script


def shim_args(*extra: str) -> list[str]:
    return ["-namespace", "ns1", "-debug", f"--address={ADDRESS}", "-publish-binary", "/usr/bin/containerd",
            "-id", "c1", *extra, "start"]


LAUNCHER = ["-I", "-S", "-c", "import sys; from shim.launch.cli import main; main()", "/the/root"]


def relay_argv(python: Path | str, args: list[str]) -> list[str]:
    """As the bin script runs it: the word count, then the Python launcher's command line."""
    return [str(RELAY), str(1 + len(LAUNCHER)), str(python), *LAUNCHER, *args]


def run_relay(python: Path | str, tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "SHIM_PY_TEMPLATE_DIR": str(tmp_path), "RELAY_TEST": "yes", **env}
    return subprocess.run(relay_argv(python, args), capture_output=True, text=True,
                          env=environ, cwd=tmp_path, timeout=30, check=False)


class FakeTemplate:
    """A SOCK_SEQPACKET listener at the path the relay computes; ``answer`` decides what it says."""

    def __init__(self, path: str, answer) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(4)
        self.answer = answer
        self.requests: list[tuple[LaunchRequest, list[int]]] = []
        self.thread = threading.Thread(target=self._serve_one, daemon=True)
        self.thread.start()

    def _serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            self.requests.append((LaunchRequest.parse(message), fds))
            try:
                self.answer(conn, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (Linux) if nobody came
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=30)


@pytest.fixture
def fake_template(tmp_path: Path, fake_python: Path):
    made: list[FakeTemplate] = []

    def make(answer) -> FakeTemplate:
        made.append(FakeTemplate(template_client.socket_path(ADDRESS, str(tmp_path), python=str(fake_python)),
                                 answer))
        return made[-1]

    yield make
    for t in made:
        t.close()


def test_the_relay_sends_the_start_and_its_launcher_status_is_its_own(tmp_path, fake_python, fake_template):
    said: list[bytes] = []

    def launcher(conn: socket.socket, fds: list[int]) -> None:
        conn.send(b"4242")
        conn.settimeout(30)
        said.append(conn.recv(8))
        os.write(fds[1], b"unix:///run/containerd/s/abc")  # the launcher child writes containerd's stdout
        conn.send(bytes([7]))

    template = fake_template(launcher)
    args = shim_args()
    result = run_relay(fake_python, tmp_path, args)
    assert (result.returncode, result.stdout) == (7, "unix:///run/containerd/s/abc"), result.stderr
    assert said == [b"go"]
    [(request, fds)] = template.requests
    assert len(fds) == 3
    assert request.args == args
    assert request.cwd == str(tmp_path)
    assert request.parent == os.getpid()  # containerd's pid: the relay's parent
    assert request.thp_original == get_thp_disable()
    assert request.env["RELAY_TEST"] == "yes"
    assert request.env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("args", [
    ["-address", ADDRESS, "-id", "c1", "start"],
    ["--address", ADDRESS, "start"],
    ["-debug=true", "-id", "x", "-address=" + ADDRESS, "start"],
    ["-v", "-info", "-namespace", "-address", "-address", ADDRESS, "start"],  # a value that looks like a flag
])
def test_the_relay_finds_the_address_as_go_flags_give_it(tmp_path, fake_python, fake_template, args):
    template = fake_template(lambda conn, fds: conn.send(b"stale"))
    result = run_relay(fake_python, tmp_path, args)
    assert len(template.requests) == 1, result  # it found the template's socket: the key matched
    assert result.stdout.startswith("fallback")


def test_no_template_means_the_python_launcher(tmp_path, fake_python):
    """The command line it was given, as it was given (the bin script writes it once, for both)."""
    result = run_relay(fake_python, tmp_path, shim_args())
    assert result.returncode == 0
    assert result.stdout == " ".join(["fallback", *LAUNCHER, *shim_args()]) + "\n"


@pytest.mark.parametrize("argv", [[], ["6"], ["x", "python", "start"], ["0", "python", "start"],
                                  ["3", "python", "start"], ["-1", "python", "start"]])
def test_a_relay_run_without_a_word_count_it_can_use_says_how_to_run_it(argv):
    result = subprocess.run([str(RELAY), *argv], capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("usage: start-relay N PYTHON ARGS... SHIM-ARGS...")


@pytest.mark.parametrize("answer", [b"stale", b"late", b"0", b"-1", b"12ab", b""])
def test_a_refusal_means_the_python_launcher_and_no_go(tmp_path, fake_python, fake_template, answer):
    said: list[bytes] = []

    def refuse(conn: socket.socket, fds: list[int]) -> None:
        if answer:
            conn.send(answer)
        else:
            conn.shutdown(socket.SHUT_WR)
        conn.settimeout(30)
        said.append(conn.recv(8))

    template = fake_template(refuse)
    result = run_relay(fake_python, tmp_path, shim_args())
    assert result.stdout.startswith("fallback -I -S -c"), result
    template.thread.join(timeout=30)
    assert said == [b""], "a refused launch must never get its go"


def test_a_template_that_does_not_answer_in_time_means_the_python_launcher(tmp_path, fake_python, fake_template):
    answered = threading.Event()

    def stuck(conn: socket.socket, fds: list[int]) -> None:
        conn.settimeout(30)
        assert conn.recv(8) == b""  # the relay gave up and went away: no go
        answered.set()

    fake_template(stuck)
    result = run_relay(fake_python, tmp_path, shim_args())
    assert result.stdout.startswith("fallback -I -S -c"), result
    assert answered.wait(30)


def test_a_launcher_that_dies_without_a_status_fails_the_start(tmp_path, fake_python, fake_template):
    def dies(conn: socket.socket, fds: list[int]) -> None:
        conn.send(b"4242")
        conn.settimeout(30)
        conn.recv(8)

    fake_template(dies)
    result = run_relay(fake_python, tmp_path, shim_args())
    assert result.returncode == 1
    assert "without a status" in result.stderr
    assert not result.stdout


def test_template_disabled_means_the_python_launcher_without_asking(tmp_path, fake_python, fake_template):
    template = fake_template(lambda conn, fds: conn.send(b"4242"))
    result = run_relay(fake_python, tmp_path, shim_args(), SHIM_PY_TEMPLATE="0")
    assert result.stdout.startswith("fallback"), result
    template.close()
    assert template.requests == []


@pytest.mark.parametrize("message", [
    b"launch\x00", b"launch\x001\x000\x00/\x002\x00start\x00", b"launch\x00x\x000\x00/\x000\x00",
    b"launch\x001\x000\x00/\x000\x00NOEQUALS\x00", b"fork\x001\x000\x00/\x000\x00",
])
def test_malformed_launch_requests_are_refused(message):
    with pytest.raises(ValueError):
        LaunchRequest.parse(message)


def test_a_launch_request_parses():
    r = LaunchRequest.parse(b"launch\x0012\x001\x00/b\x002\x00-id\x00start\x00A=1\x00B=x=y\x00")
    assert (r.parent, r.thp_original, r.cwd, r.args, r.env) == (12, 1, "/b", ["-id", "start"], {"A": "1", "B": "x=y"})


# -- with a real template -------------------------------------------------------------------------------

def test_a_start_through_the_relay_runs_in_the_template_and_forks_the_shim(tmp_path):
    """The whole path with a template process: the launcher in a child of the template, the
    shim forked from there with its stdio off containerd's pipes; output, status, address file
    as from a launcher of its own. /the/root is no checkout: a fallback would fail."""
    path = template_client.socket_path(ADDRESS, str(tmp_path), python=sys.executable)
    proc = start_template(Path(path))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
    id = f"relay-{os.getpid()}"
    shim_socket = shim_socket_path(ADDRESS, "ns1", id)
    try:
        wait_for(lambda: lean.accepts(path, lean.SOCK_SEQPACKET), what="the template to listen")
        result = subprocess.run(
            relay_argv(sys.executable, ["-namespace", "ns1", "-address", ADDRESS, "-id", id, "start"]),
            capture_output=True, text=True, cwd=bundle, timeout=30, check=False,
            env={**os.environ, "SHIM_PY_TEMPLATE_DIR": str(tmp_path), "TTRPC_ADDRESS": ADDRESS + ".ttrpc"})
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout == f"unix://{shim_socket}"
        assert (bundle / "address").read_text() == result.stdout
        report = read_report(bundle)  # the (fake) shim's body ran
        assert report["fds"] == [0, 1, 2, 3]
        # not containerd's pipes: containerd reads the start's output until every holder closed it
        assert report["stdio"] == ["/dev/null"] * 3
        assert report["env"]["TTRPC_ADDRESS"] == ADDRESS + ".ttrpc"
        assert report["cwd"] == str(bundle)
        config = ShimConfig.decode(report["config"])
        assert (config.namespace, config.id, config.bundle, config.socket_path) == ("ns1", id, str(bundle), shim_socket)
        assert report["ppid"] != proc.pid  # the template's grandchild, never its child
        assert report["sid"] != report["pid"] and report["sid"] != os.getsid(proc.pid)
        # forked before the launcher child ran the start (so it carries none of the pages the
        # start wrote): it came from the child's first lines, not from inside the start
        assert "_become_launcher" in report["stack"]
        assert not {"_run_start", "run_start", "start", "_start_shim"} & set(report["stack"]), report["stack"]
        assert proc.poll() is None  # the template goes on serving
    finally:
        stop(proc)
        try:
            os.unlink(shim_socket)
        except FileNotFoundError:
            pass


def forks_of(template: subprocess.Popen) -> list[int]:
    """Live processes forked from the template (its title, not its pid): launcher children, shims-to-be."""
    with open(f"/proc/{template.pid}/cmdline", "rb") as f:
        title = f.read()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == template.pid or not alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() == title:
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_a_relayed_start_that_joins_a_running_shim_leaves_no_process(tmp_path):
    """A start whose group's shim already serves (a pod's second container) needs no shim:
    it prints that shim's address, and the shim-to-be forked for it exits unseen."""
    path = template_client.socket_path(ADDRESS, str(tmp_path), python=sys.executable)
    proc = start_template(Path(path))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.containerd.runc.v2.group": "pod"}}))
    shim_socket = shim_socket_path(ADDRESS, "ns1", "pod")
    os.makedirs(os.path.dirname(shim_socket), exist_ok=True)
    serving = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # the group's running shim
    try:
        serving.bind(shim_socket)
        serving.listen(8)
        wait_for(lambda: lean.accepts(path, lean.SOCK_SEQPACKET), what="the template to listen")
        result = subprocess.run(
            relay_argv(sys.executable, ["-namespace", "ns1", "-address", ADDRESS, "-id", "c2", "start"]),
            capture_output=True, text=True, cwd=bundle, timeout=30, check=False,
            env={**os.environ, "SHIM_PY_TEMPLATE_DIR": str(tmp_path)})
        assert (result.returncode, result.stderr, result.stdout) == (0, "", f"unix://{shim_socket}")
        wait_for(lambda: not forks_of(proc), what="the launcher child and its shim-to-be to exit")
        assert not (bundle / "report.json").exists()  # no shim ran
        assert proc.poll() is None
    finally:
        serving.close()
        stop(proc)
        try:
            os.unlink(shim_socket)
        except FileNotFoundError:
            pass


SLOW_SHIM_TO_BE = """
import time
import shim.template.server as server
_wait = server._wait_for_orders
def _slow(sock):
    time.sleep(0.5)
    _wait(sock)
server._wait_for_orders = _slow
"""


def test_a_relayed_start_whose_bundle_vanished_says_why(tmp_path):
    """The bundle directory is gone when the launcher child would enter it (removed after the
    relay sent its cwd): the start fails with a message on stderr, as the Python launcher's.
    The shim-to-be forked for it is slow to run (a loaded machine): the status still comes only
    once nothing holds containerd's pipes."""
    path = template_client.socket_path(ADDRESS, str(tmp_path), python=sys.executable)
    proc = start_template(Path(path), prelude=SLOW_SHIM_TO_BE)
    gone = tmp_path / "bundle-gone"
    args = ["-namespace", "ns1", "-address", ADDRESS, "-id", "c1", "start"]
    message = b"\0".join([b"launch", str(os.getpid()).encode(), b"0", os.fsencode(gone), str(len(args)).encode(),
                          *(a.encode() for a in args), b"PATH=/usr/bin", b""])
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        wait_for(lambda: lean.accepts(path, lean.SOCK_SEQPACKET), what="the template to listen")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(30)
            conn.connect(path)
            null = os.open(os.devnull, os.O_RDONLY)
            socket.send_fds(conn, [message], [null, out_w, err_w])
            for fd in (null, out_w, err_w):
                os.close(fd)  # the launcher child holds them now
            assert int(conn.recv(64)) > 0
            conn.send(b"go")
            assert conn.recv(1) == b"\x01"
        # The status came after the child and the shim-to-be it forked let go of its stdio: both
        # are at EOF already (a process still holding them would fail the select, not hang the read).
        assert select.select([out_r, err_r], [], [], 0)[0] == [out_r, err_r]
        with os.fdopen(err_r) as err, os.fdopen(out_r) as out:
            assert out.read() == ""
            assert err.read() == f"start failed: [Errno 2] No such file or directory: '{gone}'\n"
        assert lean.accepts(path, lean.SOCK_SEQPACKET)  # the template goes on serving
        wait_for(lambda: not forks_of(proc), what="the launcher child and its shim-to-be to exit")
    finally:
        stop(proc)


SPAWN_TAKES_FD_3 = """
import os
import shim.launch.launcher as launcher
def _spawn(config, sock, shared=False):
    os.dup2(sock.fileno(), 3)  # as launcher.spawn does with the listener
    with open(os.path.join(config.bundle, "spawned"), "w") as f:
        f.write("shared" if shared else "own")
    return os.getpid()  # a live pid for the OOM score (the launcher's own: it exits anyway)
launcher.spawn = _spawn
"""


def test_a_relayed_start_that_spawns_the_namespace_shim_still_answers(tmp_path):
    """ShimGroup = "namespace": the launcher child spawns an interpreter for the namespace's
    shim, with the listener moved to fd 3. The launcher's own files (the relay's connection,
    its shim-to-be's socket) are never fd 3, so the status still reaches the relay."""
    from google.protobuf import any_pb2

    from shim.proto import runtimeoptions_pb2

    path = template_client.socket_path(ADDRESS, str(tmp_path), python=sys.executable)
    proc = start_template(Path(path), prelude=SPAWN_TAKES_FD_3)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                          value=runtimeoptions_pb2.Options(config_body=b'ShimGroup = "namespace"\n').SerializeToString())
    shim_socket = shim_socket_path(ADDRESS, "ns1", "@namespace")
    try:
        wait_for(lambda: lean.accepts(path, lean.SOCK_SEQPACKET), what="the template to listen")
        result = subprocess.run(
            relay_argv(sys.executable, ["-namespace", "ns1", "-address", ADDRESS, "-id", "c1", "start"]),
            input=options.SerializeToString(), capture_output=True, cwd=bundle, timeout=30, check=False,
            env={**os.environ, "SHIM_PY_TEMPLATE_DIR": str(tmp_path)})
        assert (result.returncode, result.stderr, result.stdout) == (0, b"", f"unix://{shim_socket}".encode())
        assert (bundle / "spawned").read_text() == "shared"
    finally:
        stop(proc)
        Path(shim_socket).unlink(missing_ok=True)
