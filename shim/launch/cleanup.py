"""The ``delete`` action: clean up after a shim that died.

containerd runs ``<shim> -namespace NS -address A -publish-binary B -id ID -bundle PATH delete``
(cleanupAfterDeadShim), in 1.6 also after every normal ``ctr run --rm``. Like
the Go shim: force-delete the runc container, unmount the rootfs, and print a
DeleteResponse (pid from init.pid, exit status 137, exited now) on stdout.
Warnings go to stderr, which containerd logs as cleanup warnings. No trio
and no protobuf here: containerd 1.6 waits for this after every ``ctr run
--rm``, so it must be quick (runc is skipped when its state dir is gone).
"""

from __future__ import annotations

import os
import sys
import time

from shim.common import wire
from shim.common.bundle import ADDRESS_FILE, DELETE_RESPONSE_FILE, INIT_PID_FILE, ROOTFS_DIR, RUNC_LOG, read_pid_file
from shim.common.mount import unmount_all
from shim.common.options import RUNC_ROOT_FILE, RuncOptions
from shim.runc_client.config import RuncConfig, last_log_error, log_size, start_error
from shim.thp import runc_command

from .flags import Flags

KILLED = 128 + 9


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def force_delete(config: RuncConfig, id: str) -> None:
    import subprocess

    offset = log_size(config.log_path)
    try:
        argv, preexec = runc_command(config.global_args() + ["delete", "--force", id], config.thp_original)
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            preexec_fn=preexec,
        )
    except OSError as e:
        _warn(f"failed to remove runc container: {start_error(config.binary, e) or e}")
        return
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() or last_log_error(config.log_path, offset)
        if "does not exist" not in detail:
            _warn(f"failed to remove runc container: {detail}")


def _runc_may_hold(bundle: str, id: str) -> bool:
    """False only when we know runc's root and it has no state for id (the usual
    case after a clean shim exit): then neither options.json nor runc is needed."""
    try:
        with open(os.path.join(bundle, RUNC_ROOT_FILE)) as f:
            root = f.read().strip()
    except OSError:
        return True  # a bundle from elsewhere: read options.json and ask runc
    return os.path.exists(os.path.join(root, id))


def _remove_dead_socket(bundle: str) -> None:
    """A shim that died (SIGKILL, OOM) leaves its socket; remove it unless a shim
    still answers there (a pod's shim serving other containers)."""
    from shim.common import lean

    try:
        with open(os.path.join(bundle, ADDRESS_FILE)) as f:
            address = f.read().strip()
    except OSError:
        return
    path = address.removeprefix("unix://")
    if not path.startswith("/") or not os.path.exists(path):
        return
    with lean.socket_dir_lock(os.path.dirname(path)):  # not while a new shim of the group is mid-start
        if lean.accepts(path):
            return  # a live shim (a pod's or a namespace's, serving other tasks)
        try:
            os.unlink(path)
        except OSError as e:
            _warn(f"failed to remove the dead shim's socket {path}: {e}")


def delete(flags: Flags) -> int:
    bundle = flags.bundle or os.getcwd()
    try:  # a clean Delete left the answer (the wrapper script normally prints it itself)
        with open(os.path.join(bundle, DELETE_RESPONSE_FILE), "rb") as f:
            sys.stdout.buffer.write(f.read())
        sys.stdout.flush()
        return 0
    except OSError:
        pass
    if flags.id and _runc_may_hold(bundle, flags.id):
        options = RuncOptions.read(bundle)
        config = RuncConfig(
            binary=options.binary,
            root=options.runc_root(flags.namespace),
            log_path=os.path.join(bundle, RUNC_LOG),
            systemd_cgroup=options.systemd_cgroup,
        )
        if os.path.exists(os.path.join(config.root, flags.id)):
            force_delete(config, flags.id)  # runc/crun keep <root>/<id> while a container exists
    try:
        unmount_all(os.path.join(bundle, ROOTFS_DIR))
    except OSError as e:
        _warn(f"failed to cleanup rootfs mount: {e}")
    _remove_dead_socket(bundle)
    try:
        pid = read_pid_file(os.path.join(bundle, INIT_PID_FILE))
    except (OSError, ValueError) as e:
        _warn(f"failed to read init pid file: {e}")
        pid = 0

    sys.stdout.buffer.write(wire.delete_response(pid, KILLED, time.time_ns()))
    sys.stdout.flush()
    return 0
