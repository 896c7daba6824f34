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


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def read_annotations(bundle: str) -> dict[str, str]:
    """The OCI spec's annotations (grouping keys live there); {} if unreadable."""
    import json  # off the start path until grouping needs it

    try:
        with open(os.path.join(bundle, CONFIG_FILE)) as f:
            return dict(json.load(f).get("annotations") or {})
    except (OSError, ValueError, AttributeError):
        return {}
