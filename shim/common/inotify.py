"""inotify(7) through ctypes: the standard library has no binding.

Used by the OOM watcher (memory.events of cgroup v2, shim.daemon.oom) and by the warm
template (its own source files, shim.template.server). Calls raise OSError with errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_IGNORED = 0x00008000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc: ctypes.CDLL | None = None


def _call(name: str, *args: object) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    try:
        function = getattr(_libc, name)
    except AttributeError:  # a C library without inotify
        raise OSError(errno.ENOSYS, f"{name}: not in the C library") from None
    result: int = function(*args)
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return result


def init() -> int:
    """A new non-blocking, close-on-exec inotify instance (EMFILE: fs.inotify.max_user_instances)."""
    return _call("inotify_init1", os.O_NONBLOCK | os.O_CLOEXEC)


def add_watch(fd: int, path: str, mask: int) -> int:
    """The watch descriptor (ENOSPC: fs.inotify.max_user_watches reached)."""
    return _call("inotify_add_watch", fd, os.fsencode(path), mask)


def rm_watch(fd: int, wd: int) -> None:
    _call("inotify_rm_watch", fd, wd)


def read_masks(fd: int) -> dict[int, int]:
    """Read every pending event; the OR of their masks per watch descriptor."""
    masks: dict[int, int] = {}
    while True:
        try:
            buf = os.read(fd, 4096)
        except BlockingIOError:
            return masks
        if not buf:
            return masks
        off = 0
        while off + _EVENT.size <= len(buf):
            wd, m, _, length = _EVENT.unpack_from(buf, off)
            masks[wd] = masks.get(wd, 0) | m
            off += _EVENT.size + length
