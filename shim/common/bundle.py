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


#: Annotations that put containers in one shim, in the order the Go shim reads them.
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
#: The annotation an operator sets on purpose: it wins over ShimGroup = "namespace".
EXPLICIT_GROUP_ANNOTATIONS = GROUP_ANNOTATIONS[:1]
#: The group of every other task of a namespace in ShimGroup = "namespace" mode. "@" cannot
#: appear in a containerd id, so no task's own group can collide with it.
NAMESPACE_GROUP = "@namespace"


def group_id(bundle: str, id: str, namespace_mode: bool = False) -> str:
    """Which shim serves this container: its group's, else its own (or, in
    namespace mode, the namespace's), read as the Go shim reads it.

    CRI puts a pod's containers (and its sandbox, whose sandbox-id is its own
    id) in one group. In namespace mode only the explicit group annotation
    counts: every pod of the namespace shares the one shim. As in Go, only the
    top-level ``annotations`` object counts, the first label present decides
    even when its value is empty, and a config.json that is missing or that Go
    could not decode (not JSON, not an object, an annotation that is not a
    string) fails the start (OSError or ValueError). This runs on every start:
    the document is parsed by the C scanner under ``json`` (``_json``), since
    importing ``json`` itself costs ~10 ms here (it compiles regular expressions).
    """
    with open(os.path.join(bundle, CONFIG_FILE), "rb") as f:
        spec = _decode_json(f.read())
    if not isinstance(spec, dict):
        raise ValueError(f"{CONFIG_FILE}: not a JSON object")
    annotations = spec.get("annotations")
    fallback = NAMESPACE_GROUP if namespace_mode else id
    if annotations is None:
        return fallback
    if not isinstance(annotations, dict) or not all(v is None or isinstance(v, str) for v in annotations.values()):
        raise ValueError(f"{CONFIG_FILE}: annotations must map strings to strings")
    for key in EXPLICIT_GROUP_ANNOTATIONS if namespace_mode else GROUP_ANNOTATIONS:
        if key in annotations:
            # Go: the first label present decides, even empty. Namespace mode is ours: an
            # empty explicit group there asks for no group of its own.
            return annotations[key] or (fallback if namespace_mode else "")
    return fallback


class _Strict:
    """The decoder settings ``json.loads`` uses, for ``_json.make_scanner``."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{CONFIG_FILE}: {name} is not JSON")  # Go refuses NaN and Infinity


_JSON_SPACE = " \t\n\r"


def _decode_json(raw: bytes) -> object:
    """``json.loads(raw)`` without importing ``json`` (a ValueError for anything it refuses)."""
    from _json import make_scanner

    text = raw.decode()
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        # typeshed wants a JSONDecoder-shaped context; the C scanner reads only these attributes
        value, end = make_scanner(_Strict())(text, start)  # type: ignore[arg-type]
    except StopIteration as e:
        raise ValueError(f"{CONFIG_FILE}: not JSON (at offset {e.value})") from None
    if text[end:].strip(_JSON_SPACE):
        raise ValueError(f"{CONFIG_FILE}: extra data after the JSON document (offset {end})")
    return value
