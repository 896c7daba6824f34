"""Standard-library shortcuts for the processes that run once per container.

``start`` and ``delete`` each run in a fresh interpreter on a container's
start or teardown path. ``socket`` pulls in selectors and enum (~6 ms) and
``hashlib`` loads OpenSSL (~2.5 ms); the few calls those paths need are
available from the C modules underneath, so they are used directly here.
"""

from __future__ import annotations

import _socket
import os
from array import array

AF_UNIX = _socket.AF_UNIX
SOCK_STREAM = _socket.SOCK_STREAM
SOCK_SEQPACKET = _socket.SOCK_SEQPACKET
#: signal.SIGKILL on Linux: the signal module costs the launcher ~4 ms to import.
SIGKILL = 9

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from hashlib import sha256 as sha256  # noqa: PLC0414 - re-exported (template); typeshed knows its API
else:
    try:  # CPython's built-in hash modules (3.11: _sha256, 3.12+: _sha2)
        from _sha256 import sha256
    except ImportError:  # pragma: no cover
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256


def sha256_hex(data: bytes) -> str:
    return sha256(data).hexdigest()


def unix_socket(kind: int = SOCK_STREAM) -> _socket.socket:
    """A close-on-exec AF_UNIX socket (what socket.socket would make)."""
    return _socket.socket(AF_UNIX, kind)


#: How long a liveness probe may wait for a connect (a full backlog blocks it).
PROBE_TIMEOUT = 1.0


def accepts(path: str, kind: int = SOCK_STREAM) -> bool:
    """Whether something listens on the unix socket at path.

    A listener whose backlog is full (a busy shim) makes connect wait, or fail with
    EAGAIN: it is alive, never a dead shim's leftover to remove.
    """
    probe = unix_socket(kind)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
        return True
    except (TimeoutError, BlockingIOError):
        return True
    except OSError:
        return False
    finally:
        probe.close()


def send_fds(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    """socket.send_fds without the socket module: one message, fds as SCM_RIGHTS."""
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array("i", fds).tobytes())])


def proc_stat(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name (state first); [] if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_state(pid: int) -> bytes:
    """The state letter of /proc/<pid>/stat (b"R", b"S", b"T", b"Z", ...); b"" if there is no such process."""
    fields = proc_stat(pid)
    return fields[0] if fields else b""


#: The kernel's per-task flag set as do_exit begins (include/linux/sched.h).
PF_EXITING = 0x4


def process_ending(pid: int) -> bool:
    """Gone, a zombie, or already inside the kernel's exit (PF_EXITING) though not a zombie yet.

    The last case is the window a plain state check misses: a pid-namespace init
    that was SIGKILLed stays in do_exit (state S or D) until every other process
    of its namespace is reaped, including the one ``runc exec`` was starting.
    """
    fields = proc_stat(pid)
    if len(fields) < 7 or fields[0] in (b"Z", b"X"):
        return True
    try:
        return bool(int(fields[6]) & PF_EXITING)
    except ValueError:
        return False


#: Held while one process decides whether a shim socket is live (and binds or removes it):
#: between a new shim's bind and its listen the socket refuses connections, so a check that
#: ran then would take a starting shim for a dead one.
SOCKET_LOCK = ".containerd-shim-runc-v2-py.lock"


class socket_dir_lock:
    """``with socket_dir_lock(directory):`` an exclusive flock shared by every launcher and
    ``delete`` action of that socket directory (held for a bind or a connect, no longer)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, SOCKET_LOCK)
        self.fd = -1

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)
