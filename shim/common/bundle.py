"""Files in the bundle directory that the shim reads and writes.

containerd writes config.json, rootfs/, the ``log`` fifo; the shim writes
``address`` (containerd 1.6/1.7 read it to reconnect after a restart),
``init.pid`` (via runc --pid-file), ``options.json`` and ``runtime``.
Writes are atomic (temp + rename) so a reader never sees half a file.
"""

from __future__ import annotations

import os

ADDRESS_FILE = "address"
INIT_PID_FILE = "init.pid"
CONFIG_FILE = "config.json"
ROOTFS_DIR = "rootfs"
LOG_FIFO = "log"
RUNC_LOG = "log.json"
#: The DeleteResponse the ``delete`` action prints, left by a clean Delete (see the wrapper).
DELETE_RESPONSE_FILE = "delete-response"


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    write_atomic_bytes(path, text.encode(), mode)


def write_atomic_bytes(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write through a temp file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # an old temp file, or the umask, must not decide
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


#: Files only the shim and its ``delete`` action read (the Go shim writes its options 0600).
PRIVATE = 0o600


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
