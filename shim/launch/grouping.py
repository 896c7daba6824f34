"""Which shim serves a task: the grouping rules, in one place.

Everything that decides whether a new task gets a shim of its own or joins a
running one lives here, and nowhere else: the annotations of the bundle's
config.json (read as the Go shim reads them), the ShimGroup runtime option
(``"pod"``, the Go shim's behaviour, or ``"namespace"``: one shim for every task
of a namespace) and the socket a group's shim listens on, which is its
identity (the Go shim's address derivation, so a restarted containerd and the
``delete`` action find the same socket).

Runs in the per-start launcher: standard library only (see shim/launch).
"""

from __future__ import annotations

import os

from shim.common import lean
from shim.common.bundle import CONFIG_FILE
from shim.common.config import SOCKET_DIR
from shim.common.record import record

#: ShimGroup values (runtime options TOML): which tasks one shim process serves.
GROUP_POD = "pod"  # the Go shim's behaviour: one shim per task, a pod's containers share one
GROUP_NAMESPACE = "namespace"  # one shim per containerd address and namespace
SHIM_GROUPS = ("", GROUP_POD, GROUP_NAMESPACE)


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


_GROUP_KEYS = ("shimgroup", "shim_group")


def shim_group(toml: str) -> str:
    """The ShimGroup a runtime options TOML asks for: "" (none), "pod" or "namespace".

    An unknown value is an error (ValueError): guessing would put tasks in the
    wrong shim. Unreadable TOML is ignored, as the Go shim's start ignores
    unreadable options (the shim reports them at Create).
    """
    group = toml_group(toml)
    if group not in SHIM_GROUPS:
        raise ValueError(f"ShimGroup {group!r}: must be {GROUP_POD!r} or {GROUP_NAMESPACE!r}")
    return group


def toml_group(text: str) -> str:
    """ShimGroup's value (``ShimGroup`` or ``shim_group``, any case), the one reader of that key.

    A flat TOML is scanned line by line; tomllib (~20 ms to import, on every CRI
    start) only decides anything less simple. A value that is not a string, or a
    TOML that does not parse, reads as "" (ignored, as above).
    """
    if "group" not in text.lower():
        return ""
    value = _flat_toml_string(text, _GROUP_KEYS)
    if value is not None:
        return value
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return ""
    keys = {key.lower(): value for key, value in data.items()}
    found = keys.get(_GROUP_KEYS[0], keys.get(_GROUP_KEYS[1], ""))
    return found if isinstance(found, str) else ""


def _flat_toml_string(text: str, keys: tuple[str, ...]) -> str | None:
    """The plain string value of the first of ``keys`` (any case) in a TOML without tables,
    multi-line values or escapes: "" if absent, None when tomllib must decide."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, rest = line.partition("=")
        if not eq or line.startswith("["):
            return None
        if key.strip().strip('"').lower() not in keys:
            continue
        rest = rest.strip()
        quote = rest[:1]
        end = rest.find(quote, 1) if quote in ('"', "'") else -1
        if end < 0 or (quote == '"' and "\\" in rest[1:end]):
            return None
        after = rest[end + 1 :].strip()
        if after and not after.startswith("#"):
            return None
        return rest[1:end]
    return ""


def socket_path(containerd_address: str, namespace: str, group_id: str, socket_dir: str = SOCKET_DIR) -> str:
    """Same address the Go shim derives: <socket_dir>/sha256(join(address, namespace, id))."""
    digest = lean.sha256_hex(os.path.join(containerd_address, namespace, group_id).encode())
    return os.path.join(socket_dir, digest)




@record
class Placement:
    """Where a new task is served: the socket of its group's shim."""

    socket_path: str
    #: The namespace's shim (ShimGroup = "namespace"), which serves every task of the namespace.
    shared: bool


def place(bundle: str, instance_id: str, namespace: str, containerd_address: str, socket_dir: str, group: str) -> Placement:
    """The socket that serves task ``instance_id`` given its bundle and the ShimGroup ``group``."""
    namespace_mode = group == GROUP_NAMESPACE
    served_by = group_id(bundle, instance_id, namespace_mode=namespace_mode)
    path = socket_path(containerd_address, namespace, served_by, socket_dir)
    return Placement(path, shared=namespace_mode and served_by == NAMESPACE_GROUP)
