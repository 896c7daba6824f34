"""Mounting the task's rootfs (CreateTaskRequest.rootfs) and undoing it.

containerd hands the shim a list of mounts (usually one overlay) to assemble
at ``<bundle>/rootfs``. ``parse_options`` is the pure part (mount(8)-style
options → flags, propagation and data string) and is unit-tested; the rest is
thin syscalls via ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .record import Factory, record

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

# option -> (clear?, flag)
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}


@record
class MountSpec:
    """One mount as containerd describes it (containerd.types.Mount)."""

    type: str
    source: str
    options: list[str] = Factory(list)


@record
class ParsedOptions:
    flags: int
    propagation: int
    data: str


def parse_options(options: list[str]) -> ParsedOptions:
    """Split mount(8)-style options into MS_* flags, a propagation flag and fs data."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for option in options:
        if option in _FLAG_OPTIONS:
            clear, flag = _FLAG_OPTIONS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION_OPTIONS:
            propagation = _PROPAGATION_OPTIONS[option]
        else:
            data.append(option)
    return ParsedOptions(flags, propagation, ",".join(data))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    result = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None
    )
    _check(result, f"mount {fstype or 'bind'} {source} on {target}")


def mount(spec: MountSpec, target: str) -> None:
    parsed = parse_options(spec.options)
    flags = parsed.flags
    _mount(spec.source, target, spec.type, flags & ~MS_REMOUNT if flags & MS_BIND else flags, parsed.data)
    # A bind mount ignores MS_RDONLY and friends on the first call; remount to apply them.
    if flags & MS_BIND and flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
        _mount("", target, "", flags | MS_REMOUNT, "")
    if parsed.propagation:
        _mount("", target, "", parsed.propagation, "")


def mount_all(specs: list[MountSpec], target: str) -> None:
    """Mount each spec on target in order; on failure undo what was mounted."""
    done = 0
    try:
        for spec in specs:
            mount(spec, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: str) -> bool:
    """Unmount the top mount at target; False when nothing is mounted there."""
    if _libc.umount2(target.encode(), 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:
        # Something still holds it (a straggler process); detach so the bundle can go.
        _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")
        return True
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> None:
    """Unmount every mount stacked at target (like containerd's mount.UnmountAll)."""
    while unmount(target):
        pass
