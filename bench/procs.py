"""Which processes belong to which shim family, and how much memory they use.

A family is every process of one shim implementation serving *our* containerd:

* ``go``: processes whose ``/proc/PID/exe`` is the Go shim binary
  (``/usr/bin/containerd-shim-runc-v2``).
* ``python``: processes whose command line shows this project's shim: the
  daemon (``python -I -c "from shim.daemon import ..."``), the launcher
  (``shim.cli``), anything titled ``containerd-shim-runc-v2-py ...`` (shims
  forked from a template set that title), and any process whose command line
  mentions ``shim.template`` (the warm template, and shims forked from it
  that could not set a title).

Other containerds' shims (test suites running at the same time) are left out:
a process with an ``-address`` flag must name our containerd socket; one
without (a template) must carry our ``TTRPC_ADDRESS`` in its environment
(containerd sets it for every shim it starts; its children inherit it).

Memory comes from ``/proc/PID/smaps_rollup``: Rss, Pss and USS
(= Private_Clean + Private_Dirty), summed over the family.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from integration.harness import GO_SHIM_BINARY, PY_SHIM_BINARY, _flag_value, all_pids

FAMILIES = ("go", "python")
PY_MARKERS = ("shim.daemon", "shim.template", "shim.cli")
TEMPLATE_MARKER = "shim.template"
TEMPLATE_SOCKET_PREFIX = "/run/containerd/s/py-template-"


def _go_exes() -> set[str]:
    exes = {"/usr/bin/" + GO_SHIM_BINARY}
    found = shutil.which(GO_SHIM_BINARY, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        exes.add(os.path.realpath(found))
    return exes


GO_SHIM_EXES = _go_exes()


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
    """The socket a template process serves (its last argument), if it looks like one."""
    if any(TEMPLATE_MARKER in a for a in argv) and argv[-1].startswith(TEMPLATE_SOCKET_PREFIX):
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
    if _exe(pid) in GO_SHIM_EXES:
        family = "go"
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


def stop_templates(address: str, timeout: float = 5.0) -> list[int]:
    """Kill our containerd's template processes and remove their socket/pid files."""
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


def measure(procs: dict[int, str]) -> dict:
    """Per-process Rss/Pss/USS (bytes) of {pid: kind} and their sums."""
    rows = []
    for pid, kind in sorted(procs.items()):
        s = smaps_rollup(pid)
        if s is None:
            continue
        argv = cmdline(pid) or []
        rows.append({
            "pid": pid,
            "kind": kind,
            # exec'd from scratch, or forked from a warm template
            "origin": "exec" if kind == "template" or _exe(pid) in GO_SHIM_EXES
            or any("shim.daemon" in a for a in argv) else "fork",
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
