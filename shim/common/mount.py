"""Mounting the task's rootfs (CreateTaskRequest.rootfs) and undoing it.

containerd hands the shim a list of mounts (usually one overlay) to assemble
at ``<bundle>/rootfs``. ``parse_options`` is the pure part (mount(8)-style
options → flags, propagation and data string) and is unit-tested; the rest is
thin syscalls via ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable

from .idmap import map_mount_in_place, mapped_lowerdirs, take_mapping, user_namespace
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
#: containerd's UnmountAll: a busy mount is retried this often, this far apart, before we detach it.
UNMOUNT_BUSY_RETRIES = 50
UNMOUNT_BUSY_DELAY = 0.05

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


def _mount_call(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    result = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None
    )
    _check(result, f"mount {fstype or 'bind'} {source} on {target}")


#: mount(2) copies at most one page of option data: a longer overlay lowerdir is EINVAL.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
#: struct loop_config: fd, block_size, struct loop_info64, 8 reserved u64
_LOOP_CONFIG = "=II QQQQQ IIII 64s64s32s QQ 8Q"
LOOP_ATTEMPTS = 10  # another process may take the free device between the query and ours


def compact_lowerdir(data: str, parent_fd_path: Callable[[str], str]) -> tuple[str, str]:
    """Overlay option data with each lowerdir given relative to the layers' common parent.

    containerd's snapshots are ``<root>/snapshots/<n>/fs``: with dozens of layers the
    absolute paths overflow the page mount(2) accepts. ``parent_fd_path(parent)`` returns a
    short path that names the parent (``/proc/self/fd/N`` of an open fd; containerd chdirs
    in a child instead); returns (new data, parent), or (data, "") when nothing is shorter.
    """
    options = data.split(",")
    for i, option in enumerate(options):
        if not option.startswith("lowerdir="):
            continue
        layers = option.removeprefix("lowerdir=").split(":")
        parent = os.path.commonpath(layers) if all(layer.startswith("/") for layer in layers) else ""
        if parent in ("", "/"):
            return data, ""
        short = parent_fd_path(parent)
        options[i] = "lowerdir=" + ":".join(
            short if layer == parent else f"{short}/{os.path.relpath(layer, parent)}" for layer in layers
        )
        return ",".join(options), parent
    return data, ""


def _mount_overlay(source: str, target: str, flags: int, data: str) -> None:
    if len(data) < PAGE_SIZE:
        _mount_call(source, target, "overlay", flags, data)
        return
    fds: list[int] = []

    def through_fd(parent: str) -> str:
        fds.append(os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        return f"/proc/self/fd/{fds[-1]}"

    try:
        compacted, _ = compact_lowerdir(data, through_fd)
        _mount_call(source, target, "overlay", flags, compacted)
    finally:
        for fd in fds:
            os.close(fd)


def attach_loop(path: str, read_only: bool) -> tuple[str, int]:
    """A free loop device backed by ``path``: (device path, an fd on it).

    The device is set to clear itself (LO_FLAGS_AUTOCLEAR) when its last user goes, so the
    unmount frees it; the caller closes the fd once the mount holds the device (closing it
    before would free the device at once).
    """
    mode = os.O_RDONLY if read_only else os.O_RDWR
    backing = os.open(path, mode | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(LOOP_ATTEMPTS):
                device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                fd = os.open(device, mode | os.O_CLOEXEC)
                flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
                config = struct.pack(_LOOP_CONFIG, backing, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags,
                                     os.fsencode(path)[:63], b"", b"", 0, 0, *[0] * 8)
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                    return device, fd
                except OSError as e:
                    os.close(fd)
                    if e.errno != errno.EBUSY:
                        raise OSError(e.errno, f"loop device for {path}: {e.strerror}") from e
            raise OSError(errno.EBUSY, f"no free loop device for {path}")
        finally:
            os.close(control)
    finally:
        os.close(backing)


def mount(spec: MountSpec, target: str) -> int:
    """One containerd mount; blocking (the shim calls it from a worker thread). Returns how
    many mounts it stacked at target (2 for an ID-mapped non-overlay); on failure it has
    taken its own mounts off again. ``uidmap=``/``gidmap=`` options: see shim.common.idmap."""
    mapping, options = take_mapping(spec.options)
    if mapping is None:
        return _mount(spec.type, spec.source, options, target, None)
    with user_namespace(mapping) as userns:
        return _mount(spec.type, spec.source, options, target, userns)


def _mount(fstype: str, source: str, options: list[str], target: str, userns: int | None) -> int:
    loop = "loop" in options
    parsed = parse_options([option for option in options if option != "loop"])
    flags = parsed.flags
    stacked = 0
    try:
        if fstype == "overlay" and userns is not None:
            with mapped_lowerdirs(parsed.data, userns, os.path.dirname(target)) as data:
                _mount_overlay(source, target, flags, data)
                stacked = 1
        else:
            _mount_source(fstype, source, target, flags, parsed.data, loop)
            stacked = 1
        # A bind mount ignores MS_RDONLY and friends on the first call; remount to apply them.
        if flags & MS_BIND and flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
            _mount_call("", target, "", flags | MS_REMOUNT, "")
        if fstype != "overlay" and userns is not None:
            map_mount_in_place(target, userns)
            stacked = 2
        if parsed.propagation:
            _mount_call("", target, "", parsed.propagation, "")
    except BaseException:
        for _ in range(stacked):
            unmount(target)
        raise
    return stacked


def _mount_source(fstype: str, source: str, target: str, flags: int, data: str, loop: bool) -> None:
    """The mount(2) of one mount as given (through a loop device for a file system image)."""
    loop_fd = -1
    if loop:
        source, loop_fd = attach_loop(source, read_only=bool(flags & MS_RDONLY))
    try:
        if fstype == "overlay":
            _mount_overlay(source, target, flags, data)
        else:
            _mount_call(source, target, fstype, flags & ~MS_REMOUNT if flags & MS_BIND else flags, data)
    finally:
        if loop_fd >= 0:
            os.close(loop_fd)  # the mount holds the device now (or, failed, it clears itself)


def mount_all(specs: list[MountSpec], target: str) -> None:
    """Mount each spec on target in order; on failure undo what was mounted."""
    done = 0
    try:
        for spec in specs:
            done += mount(spec, target)
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
        # Something still holds it (a straggler process): retry as containerd does, then
        # detach so the bundle can go.
        for _ in range(UNMOUNT_BUSY_RETRIES):
            time.sleep(UNMOUNT_BUSY_DELAY)
            if _libc.umount2(target.encode(), 0) == 0:
                return True
            if ctypes.get_errno() != errno.EBUSY:
                break
        _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")
        return True
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> None:
    """Unmount every mount stacked at target (like containerd's mount.UnmountAll)."""
    while unmount(target):
        pass
