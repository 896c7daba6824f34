"""ID-mapped mounts for user-namespace pods (containerd 2.x, Kubernetes ``hostUsers: false``).

For a pod with a user namespace containerd passes the rootfs with ``uidmap=C:H:N[,C:H:N...]``
and ``gidmap=...`` options (container id, host id, count; the pod's mapping). mount(2) knows
no such option, so, as containerd's mount package does for the Go shim:

- a user namespace with that mapping is made, only for its file descriptor;
- overlay: each lowerdir gets a read-only ID-mapped copy (open_tree(OPEN_TREE_CLONE) +
  mount_setattr(MOUNT_ATTR_IDMAP) + move_mount into a scratch directory next to the
  target) and the overlay is mounted on the copies, which go away right after (the overlay
  keeps private clones of its layers). A file the image owns as 0 shows, from the host, as
  the mapped host id (65536 for ``0:65536:65536``), hence as 0 inside the pod's user
  namespace; what the pod writes lands in the (unmapped) upperdir as the host id;
- any other type (a bind of a single-layer snapshot): mounted as usual, then an ID-mapped
  copy of it is stacked on the target (``unmount_all`` takes both off).

Only the pure part (option parsing) needs no root; the rest is syscalls through ctypes
(x86_64 numbers), no helper binary.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from .errors import InvalidArgument
from .record import record

# x86_64 syscall numbers (the new mount API)
SYS_PAUSE = 34
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

CLONE_VM = 0x100
CLONE_NEWUSER = 0x10000000
WALL = 0x40000000  # __WALL: wait for "clone" children too (os has no name for it)
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000
MS_PRIVATE = 1 << 18
#: struct mount_attr (MOUNT_ATTR_SIZE_VER0): attr_set, attr_clr, propagation, userns_fd
_MOUNT_ATTR = "=QQQQ"
#: the kernel takes at most this many lines in a uid_map/gid_map (since 4.15)
MAX_RANGES = 340
ID_LIMIT = 1 << 32
HOLDER_STACK = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_libc.clone.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


@record
class IdRange:
    """One line of a uid_map/gid_map: ``size`` ids from ``container`` map to ``host``."""

    container: int
    host: int
    size: int


@record
class IdMapping:
    uids: list[IdRange]
    gids: list[IdRange]


def parse_ranges(value: str, option: str) -> list[IdRange]:
    """``C:H:N[,C:H:N...]`` (containerd's syntax) → ranges; InvalidArgument when malformed."""
    ranges: list[IdRange] = []
    for part in value.split(","):
        fields = part.split(":")
        if len(fields) != 3 or not all(f.isdigit() and f.isascii() for f in fields):
            raise InvalidArgument(
                f"invalid {option} mount option {value!r}: expected container-id:host-id:size[,...] "
                "with non-negative decimal numbers"
            )
        r = IdRange(*(int(f) for f in fields))
        if r.size == 0 or r.container + r.size > ID_LIMIT or r.host + r.size > ID_LIMIT:
            raise InvalidArgument(f"invalid {option} mount option {value!r}: range {part!r} is empty or beyond 2^32")
        ranges.append(r)
    if len(ranges) > MAX_RANGES:
        raise InvalidArgument(f"invalid {option} mount option: {len(ranges)} ranges, the kernel takes {MAX_RANGES}")
    for kind, starts in (("container", [r.container for r in ranges]), ("host", [r.host for r in ranges])):
        if _overlap(sorted(zip(starts, (r.size for r in ranges), strict=True))):
            raise InvalidArgument(f"invalid {option} mount option {value!r}: {kind} ids overlap")
    return ranges


def _overlap(spans: list[tuple[int, int]]) -> bool:
    """Whether any of the sorted (start, size) spans reaches into the next."""
    return any(start < prev + size for (prev, size), (start, _) in itertools.pairwise(spans))


def take_mapping(options: list[str]) -> tuple[IdMapping | None, list[str]]:
    """Split ``uidmap=``/``gidmap=`` off a mount's options: (the mapping or None, the rest).

    containerd maps only when both are given and silently ignores a lone one; here a lone
    one is refused, since mounting the pod's rootfs unmapped would hand it files it cannot
    use (or, worse, host-owned ones it can)."""
    values: dict[str, str] = {}
    rest: list[str] = []
    for option in options:
        key, sep, value = option.partition("=")
        if sep and key in ("uidmap", "gidmap"):
            values[key] = value
        else:
            rest.append(option)
    if not values:
        return None, options
    if len(values) != 2:
        missing = "gidmap" if "uidmap" in values else "uidmap"
        raise InvalidArgument(f"mount option {missing}= is missing: an ID-mapped mount needs both uidmap and gidmap")
    return IdMapping(parse_ranges(values["uidmap"], "uidmap"), parse_ranges(values["gidmap"], "gidmap")), rest


def map_lines(ranges: list[IdRange]) -> str:
    """The text /proc/<pid>/uid_map takes."""
    return "".join(f"{r.container} {r.host} {r.size}\n" for r in ranges)


def _syscall(what: str, *args: object) -> int:
    result = int(_libc.syscall(*args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


@contextmanager
def user_namespace(mapping: IdMapping) -> Iterator[int]:
    """A file descriptor of a new user namespace with ``mapping``, closed on exit.

    A user namespace exists only with a process in it, and the shim is multithreaded (trio
    plus the worker thread this runs in): unshare(CLONE_NEWUSER) refuses a multithreaded
    caller, and fork() there would copy other threads' held locks into a child that then
    runs Python. So the holder is made with clone(CLONE_NEWUSER | CLONE_VM) through glibc's
    clone(), whose child runs one C function, libc's syscall(SYS_pause): no Python, no
    copied address space (it shares ours, touching only its own stack), no exec. It starts
    with every signal blocked (the calling thread blocks them around the clone), so
    Python's C signal handler never runs in it; only SIGKILL ends it. Its exit signal is 0,
    which makes it a "clone" child: the reaper's waitpid(-1) (no __WALL) never collects it,
    so it cannot be mistaken for a container's exit, and its pid stays ours (a zombie at
    worst) until we reap it here by pid. The holder lives only until the namespace fd is
    open (the fd keeps the namespace); if the shim were killed in those microseconds it
    would stay paused, harmless.
    """
    import signal  # here: the lean ``delete`` action imports this module and never maps

    stack = ctypes.create_string_buffer(HOLDER_STACK)
    top = (ctypes.addressof(stack) + HOLDER_STACK - 64) & ~15
    pause = ctypes.cast(_libc.syscall, ctypes.c_void_p)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = _libc.clone(pause, top, CLONE_NEWUSER | CLONE_VM, SYS_PAUSE)
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if pid < 0:
        raise OSError(err, f"user namespace for an ID-mapped mount: clone: {os.strerror(err)}")
    try:
        for name, ranges in (("uid_map", mapping.uids), ("gid_map", mapping.gids)):
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(map_lines(ranges))
            except OSError as e:
                raise OSError(e.errno, f"writing the user namespace's {name} {map_lines(ranges)!r}: {e.strerror}") from e
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, WALL)
        del stack  # only now: the holder ran on it
    try:
        yield fd
    finally:
        os.close(fd)


def idmapped_clone(source: str, userns_fd: int, *, read_only: bool) -> int:
    """A detached, ID-mapped, private copy of the mount tree at ``source``: its fd."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE
    tree = _syscall(f"open_tree {source}", SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), flags)
    try:
        attr = ctypes.create_string_buffer(
            struct.pack(_MOUNT_ATTR, MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if read_only else 0), 0, MS_PRIVATE, userns_fd)
        )
        _syscall(f"ID-mapping {source} (mount_setattr)", SYS_MOUNT_SETATTR, tree, b"",
                 AT_EMPTY_PATH | AT_RECURSIVE, attr, ctypes.c_size_t(len(attr.raw)))
    except BaseException:
        os.close(tree)
        raise
    return tree


def attach(tree: int, target: str) -> None:
    """Mount the detached tree ``tree`` on ``target`` (closes nothing)."""
    _syscall(f"move_mount on {target}", SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target),
             MOVE_MOUNT_F_EMPTY_PATH)


def map_mount_in_place(target: str, userns_fd: int) -> None:
    """Stack an ID-mapped copy of the mount at ``target`` on it."""
    tree = idmapped_clone(target, userns_fd, read_only=False)
    try:
        attach(tree, target)
    finally:
        os.close(tree)


@contextmanager
def mapped_lowerdirs(data: str, userns_fd: int, scratch_parent: str) -> Iterator[str]:
    """Overlay option data whose lowerdirs are read-only ID-mapped copies, attached in a
    fresh directory under ``scratch_parent`` while the block runs (mount the overlay in it);
    afterwards every copy is detached and the directory removed, whatever happened."""
    options = data.split(",")
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if index < 0:
        raise InvalidArgument("an overlay with uidmap/gidmap needs a lowerdir option")
    layers = options[index].removeprefix("lowerdir=").split(":")
    with ExitStack() as undo:
        scratch = _scratch_dir(scratch_parent)
        undo.callback(os.rmdir, scratch)
        mapped: list[str] = []
        for i, layer in enumerate(layers):
            path = os.path.join(scratch, str(i))
            os.mkdir(path, 0o700)
            undo.callback(os.rmdir, path)
            tree = idmapped_clone(layer, userns_fd, read_only=True)
            try:
                attach(tree, path)
            finally:
                os.close(tree)
            undo.callback(_detach, path)
            mapped.append(path)
        options[index] = "lowerdir=" + ":".join(mapped)
        yield ",".join(options)


def _scratch_dir(parent: str) -> str:
    import tempfile  # here: the lean ``delete`` action imports this module and never maps

    return tempfile.mkdtemp(prefix=".idmapped-", dir=parent)


def _detach(path: str) -> None:
    """Lazily unmount a scratch copy (nothing uses it: the overlay holds its own clone)."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")
