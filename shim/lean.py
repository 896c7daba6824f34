"""Standard-library shortcuts for the processes that run once per container.

``start`` and ``delete`` each run in a fresh interpreter on a container's
start or teardown path. ``socket`` pulls in selectors and enum (~6 ms) and
``hashlib`` loads OpenSSL (~2.5 ms); the few calls those paths need are
available from the C modules underneath, so they are used directly here.
"""

from __future__ import annotations

import _socket
from array import array

AF_UNIX = _socket.AF_UNIX
SOCK_STREAM = _socket.SOCK_STREAM
SOCK_SEQPACKET = _socket.SOCK_SEQPACKET

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


def accepts(path: str, kind: int = SOCK_STREAM) -> bool:
    """Whether something listens on the unix socket at path."""
    probe = unix_socket(kind)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def send_fds(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    """socket.send_fds without the socket module: one message, fds as SCM_RIGHTS."""
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array("i", fds).tobytes())])
