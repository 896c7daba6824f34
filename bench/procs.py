"""Which processes belong to which shim, and how much memory they use.

A family is every process of one shim implementation serving *our* containerd:

* ``go``: processes whose ``/proc/PID/exe`` is the Go shim binary
  (``/usr/bin/containerd-shim-runc-v2``).
* ``rust``: processes whose ``/proc/PID/exe`` is the Rust shim binary (only when
  one was found: bench/shims.py).
* ``python``: processes whose command line shows this project's shim: the
  daemon (``python -I -c "from shim.daemon import ..."``), the launcher
  (``shim.launch.cli``), anything titled ``containerd-shim-runc-v2-py ...`` (shims
  forked from a template, and the template itself, set that title), and any
  process whose command line mentions ``shim.template`` (a template or a shim
  forked from it that could not set a title).

Other containerds' shims (test suites running at the same time) are left out:
a process with an ``-address`` flag must name our containerd socket; one
without (a template) must carry our ``TTRPC_ADDRESS`` in its environment
(containerd sets it for every shim it starts; its children inherit it).

Both python variants (container mode and namespace mode) are the python family.
Which processes serve which tasks comes from the tasks themselves
(``variant_procs``): the socket named in each task bundle's ``address`` file,
and the processes listening on it.  In container mode that is one process per
task; in namespace mode one process for all of them.

Memory comes from ``/proc/PID/smaps_rollup``: Rss, Pss and USS
(= Private_Clean + Private_Dirty), summed over the processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from integration.harness import GO_SHIM_BINARY, PY_SHIM_BINARY, _flag_value, all_pids, unix_socket_holders

from .shims import RUST_PATH

FAMILIES = ("go", "python", "rust")
PY_MARKERS = ("shim.daemon", "shim.template", "shim.launch.cli")
TEMPLATE_MARKER = "shim.template"
TEMPLATE_SOCKET_PREFIX = "/run/containerd/s/py-template-"


def _go_exes() -> set[str]:
    exes = {"/usr/bin/" + GO_SHIM_BINARY}
    found = shutil.which(GO_SHIM_BINARY, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        exes.add(os.path.realpath(found))
    return exes


GO_SHIM_EXES = _go_exes()
RUST_SHIM_EXES = {os.path.realpath(RUST_PATH)} - GO_SHIM_EXES if RUST_PATH else set()


def cmdline(pid: int) -> list[str] | None:
    """argv of pid; a retitled process (setproctitle: one string) is split on spaces."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if len(args) == 1 and " " in args[0]:
        args = args[0].split()
    return args


def environ_var(pid: int, name: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return ""


def _status_field(pid: int, field: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def template_socket(argv: list[str]) -> str | None:
    """The socket a template process serves (its last argument), if it looks like one.

    A template's argv is ``python ... -c "...shim.template..." SOCKET``, or, once
    it has set its title, ``containerd-shim-runc-v2-py template SOCKET``.
    """
    if not argv or not argv[-1].startswith(TEMPLATE_SOCKET_PREFIX):
        return None
    titled = len(argv) >= 3 and os.path.basename(argv[0]) == PY_SHIM_BINARY and argv[1] == "template"
    if titled or any(TEMPLATE_MARKER in a for a in argv):
        return argv[-1]
    return None


def is_template(pid: int, argv: list[str]) -> bool:
    """A template process, not a shim forked from one (which may carry the same argv).

    A template runs in ``/``; a forked shim moves into its bundle at once.  This
    also catches a template that lost the race for its socket (still alive,
    unreachable, until it idles out): it uses memory like any other.
    """
    if template_socket(argv) is None:
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == "/"
    except OSError:
        return False


def _ours(pid: int, argv: list[str], address: str | None) -> bool:
    if address is None:
        return True
    addr = _flag_value(argv, "address")
    if addr is not None:
        return addr == address
    ttrpc = environ_var(pid, "TTRPC_ADDRESS")
    return ttrpc is None or ttrpc == address + ".ttrpc"


def classify(pid: int, address: str | None = None) -> tuple[str, str] | None:
    """(family, kind) with kind ``shim`` or ``template``; None if not a shim of ours (or gone)."""
    if pid == os.getpid():
        return None
    argv = cmdline(pid)
    if not argv:
        return None  # gone, or a kernel thread
    exe = _exe(pid)
    if exe in GO_SHIM_EXES:
        family = "go"
    elif exe and (exe in RUST_SHIM_EXES or os.path.realpath(exe) in RUST_SHIM_EXES):
        family = "rust"
    elif (any(m in a for a in argv for m in PY_MARKERS)
          or any(os.path.basename(a) == PY_SHIM_BINARY for a in argv[:3])):
        family = "python"
    else:
        return None
    if not _ours(pid, argv, address) or (_status_field(pid, "State") or "Z").startswith("Z"):
        return None
    return family, ("template" if is_template(pid, argv) else "shim")


def family_procs(address: str | None = None) -> dict[str, dict[int, str]]:
    """{family: {pid: kind}} of every shim process (of the containerd at ``address``)."""
    out: dict[str, dict[int, str]] = {f: {} for f in FAMILIES}
    for pid in all_pids():
        c = classify(pid, address)
        if c is not None:
            out[c[0]][pid] = c[1]
    return out


def family_pids(address: str | None = None, templates: bool = True) -> dict[str, list[int]]:
    """{family: sorted pids}; ``templates=False`` leaves warm templates out."""
    return {f: sorted(p for p, kind in procs.items() if templates or kind != "template")
            for f, procs in family_procs(address).items()}


def kill_pids(pids: list[int]) -> None:
    """SIGKILL these pids (found as shims of our containerd a moment ago)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_templates(address: str, timeout: float = 5.0) -> list[int]:
    """Kill our containerd's template processes and remove their socket/pid files, and the
    first start's mark that a template is wanted (so the next start is a first start again)."""
    from shim.launch import template_client as shim_template

    with contextlib.suppress(OSError):
        os.unlink(shim_template.socket_path(address) + ".wanted")
    victims = {p: cmdline(p) or [] for p, kind in family_procs(address)["python"].items() if kind == "template"}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(classify(p, address) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in victims:
        if classify(pid, address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid, argv in victims.items():
        sock = template_socket(argv)
        if sock is None:
            continue
        try:  # only the files that still name this (now dead) template
            owner = int(Path(sock + ".pid").read_text().strip())
        except (OSError, ValueError):
            owner = pid
        if owner == pid:
            for path in (sock, sock + ".pid"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return sorted(victims)


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """``/proc/PID/smaps_rollup`` as {field: bytes}; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines()[1:]:  # the first line is the address range
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024  # values are in kB
    return out


def _layout(pid: int) -> str | None:
    """Start address of the process's first mapping (its executable).

    Address-space randomisation picks it anew at every exec; a forked process
    keeps its parent's.  So a shim whose first mapping starts where a
    template's does was forked from it, whatever title both carry.
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            first = f.readline()
    except OSError:
        return None
    return first.split("-", 1)[0] or None


def _aslr() -> bool:
    try:
        return Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0"
    except OSError:
        return False


def _origin(pid: int, kind: str, argv: list[str], template_layouts: set[str]) -> str:
    """``exec`` (a process of its own) or ``fork`` (forked from a warm template)."""
    if kind == "template" or _exe(pid) in GO_SHIM_EXES | RUST_SHIM_EXES:
        return "exec"
    if template_layouts:  # exec'd shims now carry the same title as forked ones: ask the memory map
        return "fork" if _layout(pid) in template_layouts else "exec"
    # No template alive: every shim carries the same title, so argv cannot tell; a shim is forked
    # only from a live template (one that idled out leaves its shims, a rare case), so: exec'd.
    return "exec"


def measure(procs: dict[int, str]) -> dict:
    """Per-process Rss/Pss/USS (bytes) of {pid: kind} and their sums."""
    rows = []
    template_layouts = {_layout(p) for p, k in procs.items() if k == "template"} - {None} if _aslr() else set()
    for pid, kind in sorted(procs.items()):
        s = smaps_rollup(pid)
        if s is None:
            continue
        argv = cmdline(pid) or []
        rows.append({
            "pid": pid,
            "kind": kind,
            # exec'd from scratch, or forked from a warm template
            "origin": _origin(pid, kind, argv, template_layouts),
            "rss": s.get("Rss", 0),
            "pss": s.get("Pss", 0),
            "uss": s.get("Private_Clean", 0) + s.get("Private_Dirty", 0),
            "anon_huge": s.get("AnonHugePages", 0),
            "swap": s.get("Swap", 0),
            "thp_enabled": _status_field(pid, "THP_enabled"),
        })
    total = {k: sum(r[k] for r in rows) for k in ("rss", "pss", "uss", "anon_huge", "swap")}
    return {"count": len(rows), "templates": sum(r["kind"] == "template" for r in rows),
            "forked": sum(r["origin"] == "fork" for r in rows),
            "sum": total, "processes": rows}


# --------------------------------------------------------------------------
# which processes serve which tasks: the socket in the bundle's address file
# --------------------------------------------------------------------------

def task_address(bundle_dir: Path, cid: str) -> str | None:
    """The socket path a task's shim serves (``<bundle>/address``, without ``unix://``)."""
    try:
        text = (bundle_dir / cid / "address").read_text().strip()
    except OSError:
        return None
    return text.removeprefix("unix://") or None


def socket_owners(paths: set[str]) -> dict[str, set[int]]:
    """{path: pids holding a *listening* unix socket bound at path}, in one pass over /proc
    (a namespace-mode shim serves hundreds of tasks through one socket)."""
    return unix_socket_holders(paths, listening=True)


def variant_procs(address: str, bundle_dir: Path, plan: dict[str, tuple[str, list[str]]]) -> dict[str, dict]:
    """Attribute shim processes to the variants of one round.

    ``plan`` = {variant: (family, [task ids])}.  A variant's processes are
    those listening on the sockets its tasks' bundles name (kind ``shim``), its
    family's templates (python), and any other process of its family that
    serves none of the round's sockets (a launcher still exiting, a shim that
    lost a race) — counted, so nothing of the family escapes the sum — as long
    as the family has only that one variant in the round (otherwise such a
    process is reported as ``unattributed``).

    Returns {variant: {"procs": {pid: kind}, "addresses": n distinct sockets,
    "serving": n distinct serving pids, "unserved": [task ids whose socket nobody
    listens on], "extra": [pids added from the family]}} and, under
    ``"_unattributed"``, {family: [pids]}.
    """
    addrs = {v: {cid: task_address(bundle_dir, cid) for cid in ids} for v, (_, ids) in plan.items()}
    owners = socket_owners({a for by_id in addrs.values() for a in by_id.values() if a})
    fams = family_procs(address)
    by_family: dict[str, list[str]] = {}
    for v, (family, _) in plan.items():
        by_family.setdefault(family, []).append(v)
    claimed: set[int] = set()
    out: dict[str, dict] = {}
    for v, (family, _) in plan.items():
        serving: set[int] = set()
        unserved = []
        for cid, a in addrs[v].items():
            pids = owners.get(a, set()) if a else set()
            if not pids:
                unserved.append(cid)
            serving |= pids
        procs = dict.fromkeys(serving, "shim")
        for pid, kind in fams.get(family, {}).items():
            if kind == "template":
                procs[pid] = "template"
        claimed |= set(procs)
        out[v] = {"procs": procs, "addresses": len({a for a in addrs[v].values() if a}),
                  "serving": len(serving), "unserved": unserved, "extra": []}
    unattributed: dict[str, list[int]] = {}
    for family, members in fams.items():
        rest = sorted(p for p in members if p not in claimed)
        if not rest:
            continue
        owners_of_family = by_family.get(family, [])
        if len(owners_of_family) == 1:
            v = owners_of_family[0]
            for pid in rest:
                out[v]["procs"][pid] = members[pid]
            out[v]["extra"] = rest
        else:
            unattributed[family] = rest
    out["_unattributed"] = unattributed
    return out
