"""Terminals and log URIs, through a private containerd 1.6 + ctr.

* ``ctr run -t`` needs a terminal of its own: ctr runs here on a fresh pty
  (its controlling terminal, so it gets SIGWINCH). ctr puts that terminal in
  raw mode; the container's own pty (cooked) turns "\\n" into "\\r\\n".
* ctr 1.6 resizes the task's pty only *after* Start (``HandleConsoleResize``),
  so a container that reads its size at once may still see "0 0": scripts
  wait for a non-zero size.
* ``ctr run --log-uri URI`` works attached (ctr waits for the exit) and sends
  stdout = stderr = URI, no stdin. With ``-t`` ctr ignores ``--log-uri``.

Run against the Go shim with ``SHIM_RUNTIME=io.containerd.runc.v2``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest

from integration.harness import EVENTUALLY, GO_RUNTIME, NAMESPACE, PY_RUNTIME, PY_SHIM_BINARY, wait_for

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
IS_GO_SHIM = RUNTIME == GO_RUNTIME

# busybox stty: a 0x0 size is an error (exit status unreliable), so look at the output
WAIT_SIZE = "until stty size 2>/dev/null | grep -q '^[1-9]'; do sleep 0.05; done"


@pytest.fixture(autouse=True)
def _shim_installed(containerd):
    if RUNTIME == PY_RUNTIME and shutil.which(PY_SHIM_BINARY, path=containerd.env["PATH"]) is None:
        pytest.fail(f"{PY_SHIM_BINARY} not found on containerd's PATH")


# -- ctr on a pseudo-terminal -------------------------------------------------------


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


#: Runs the command in a session of its own with the pty (its stdin) as controlling terminal:
#: util-linux setsid(1), so that Popen needs no preexec_fn. A preexec_fn makes Popen fork the
#: whole pytest process, whose gRPC client threads' fork handlers then ran in the child
#: (grpc's "epoll_wait error: Bad file descriptor" on the pty) and now and then it never
#: exec'd ctr: a flaky tty test.
IN_A_SESSION_ON_ITS_STDIN = ["setsid", "--ctty", "--wait"]


class PtyRun:
    """A command on a new pty (its controlling terminal); we hold the master."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 33, cols: int = 101) -> None:
        self.master, slave = os.openpty()
        set_winsize(slave, rows, cols)
        try:
            self.proc = subprocess.Popen(IN_A_SESSION_ON_ITS_STDIN + argv, stdin=slave, stdout=slave,
                                         stderr=slave, env=env)
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)
        self.output = b""

    def read_until(self, expected: bytes, timeout: float = 30.0) -> bool:
        """Collect output until ``expected`` shows up (True) or the pty closes / times out."""
        deadline = time.monotonic() + timeout
        while expected not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return expected in self.output
        return True

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError as e:
            if e.errno == errno.EIO:  # every slave closed: ctr exited
                return False
            raise
        self.output += chunk
        return bool(chunk)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def resize(self, rows: int, cols: int) -> None:
        set_winsize(self.master, rows, cols)  # the kernel sends ctr SIGWINCH

    def finish(self, timeout: float = 60.0) -> int:
        """Read to the end; ctr's exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(deadline - time.monotonic()):
            pass
        try:
            return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


def ctr_tty(containerd, *args: str, rows: int = 33, cols: int = 101) -> PtyRun:
    return PtyRun(containerd.ctr_argv(*args), containerd.env, rows=rows, cols=cols)


# -- ctr run -t -------------------------------------------------------------------------------


def test_run_tty_has_a_terminal_of_the_clients_size(containerd, image, cid):
    run = ctr_tty(containerd, "run", "-t", "--rm", "--runtime", RUNTIME, image, cid,
                  "sh", "-c", f"tty; {WAIT_SIZE}; stty size; exit 7")
    try:
        code = run.finish()
    finally:
        run.close()
    lines = run.text.replace("\r\n", "\n").splitlines()
    assert "/dev/pts/0" in lines, run.text
    assert "33 101" in lines, run.text
    assert "\r\n" in run.text  # the container's pty is cooked (onlcr)
    assert code == 7, run.text
    assert cid not in containerd.containers()


def test_run_tty_follows_window_resize(containerd, image, cid):
    script = (f"{WAIT_SIZE}; echo size=$(stty size); i=0; "
              'while [ "$(stty size)" != "40 120" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; '
              "echo size=$(stty size)")
    run = ctr_tty(containerd, "run", "-t", "--rm", "--runtime", RUNTIME, image, cid, "sh", "-c", script)
    try:
        assert run.read_until(b"size=33 101"), run.text
        run.resize(40, 120)
        code = run.finish()
    finally:
        run.close()
    assert "size=40 120" in run.text, run.text
    assert code == 0, run.text


def test_run_tty_stdin_reaches_the_container(containerd, image, cid):
    run = ctr_tty(containerd, "run", "-t", "--rm", "--runtime", RUNTIME, image, cid,
                  "sh", "-c", 'echo ready; read line; echo "got:$line"')
    try:
        assert run.read_until(b"ready"), run.text
        run.write(b"typed words\r")  # ctr's terminal is raw: Enter is \r; the container's tty maps it to \n
        code = run.finish()
    finally:
        run.close()
    assert "got:typed words" in run.text, run.text
    assert code == 0, run.text


def test_run_tty_large_output_is_complete(containerd, image, cid):
    n = 200_000
    run = ctr_tty(containerd, "run", "-t", "--rm", "--runtime", RUNTIME, image, cid,
                  "sh", "-c", f"head -c {n} /dev/zero | tr '\\0' a; echo; echo END")
    try:
        code = run.finish()
    finally:
        run.close()
    assert code == 0
    assert run.output.count(b"a") == n
    assert b"END" in run.output


def test_exec_tty(containerd, image, cid):
    containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "600")
    try:
        run = ctr_tty(containerd, "task", "exec", "-t", "--exec-id", "tty1", cid,
                      "sh", "-c", f"tty; {WAIT_SIZE}; stty size; exit 5")
        try:
            code = run.finish()
        finally:
            run.close()
        lines = run.text.replace("\r\n", "\n").splitlines()
        assert any(line.startswith("/dev/pts/") for line in lines), run.text
        assert "33 101" in lines, run.text
        assert code == 5, run.text
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)


# -- --log-uri -----------------------------------------------------------------------------


def test_log_uri_file_appends_stdout_and_stderr(containerd, image, new_cid, tmp_path):
    log = tmp_path / "created" / "by-shim" / "ctr.log"
    uri = f"file://{log}"
    first, second = new_cid("a"), new_cid("b")
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--log-uri", uri, image, first,
                       "sh", "-c", "echo out1; echo err1 >&2; exit 3", check=False)
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    assert sorted(log.read_text().splitlines()) == ["err1", "out1"]
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--log-uri", uri, image, second,
                       "sh", "-c", "echo out2", check=False)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert sorted(lines[:2]) == ["err1", "out1"] and lines[2:] == ["out2"]
    assert (log.stat().st_mode & 0o777) == 0o644 & ~_umask()  # containerd inherited our umask


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


LOGGER = textwrap.dedent(
    """\
    #!{python} -I
    # fd 3 -> DIR/stdout, fd 4 -> DIR/stderr; argv, env -> DIR/info; then DIR/done.
    import os, selectors, signal, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish on EOF, whoever closes first
    args = sys.argv[1:]
    d = dict(zip(args[::2], args[1::2]))["dir"]
    with open(os.path.join(d, "info"), "w") as f:
        f.write(repr((args, {{k: v for k, v in os.environ.items() if k.startswith("CONTAINER_")}})))
    os.close(5)
    files = {{3: open(os.path.join(d, "stdout"), "wb"), 4: open(os.path.join(d, "stderr"), "wb")}}
    sel = selectors.DefaultSelector()
    for fd in files:
        sel.register(fd, selectors.EVENT_READ)
    while sel.get_map():
        for key, _ in sel.select():
            data = os.read(key.fd, 65536)
            if data:
                files[key.fd].write(data)
            else:
                sel.unregister(key.fd)
    for f in files.values():
        f.close()
    open(os.path.join(d, "done"), "w").close()
    """
)


@pytest.fixture
def logger(tmp_path):
    path = tmp_path / "logger.py"
    path.write_text(LOGGER.format(python=sys.executable))
    path.chmod(0o755)
    out = tmp_path / "logged"
    out.mkdir()
    return path, out


def run_with_logger(containerd, image, cid, logger, *cmd):
    path, out = logger
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--log-uri", f"binary://{path}?dir={out}",
                       image, cid, *cmd, check=False)
    # The logger ends on EOF (our shim) or when the pipes are closed at delete (Go).
    wait_for(lambda: (out / "done").exists(), timeout=EVENTUALLY, message="the logger to finish")
    return r, out


def test_log_uri_binary_gets_stdout_and_stderr(containerd, image, cid, logger):
    r, out = run_with_logger(containerd, image, cid, logger, "sh", "-c", "echo to-out; echo to-err >&2; exit 4")
    assert r.returncode == 4, r.stderr
    assert r.stdout == ""
    assert (out / "stdout").read_text() == "to-out\n"
    assert (out / "stderr").read_text() == "to-err\n"
    args, _ = eval((out / "info").read_text())
    assert args == ["dir", str(out)]


def test_log_uri_binary_env(containerd, image, cid, logger):
    _, out = run_with_logger(containerd, image, cid, logger, "true")
    _, env = eval((out / "info").read_text())
    assert env == {"CONTAINER_ID": cid, "CONTAINER_NAMESPACE": NAMESPACE}
