"""The leak census, after every check has removed its containers through ctr.

For every container id a shim's checks created (``Ids``): processes (shims, runc, anything in
the container's cgroup), mounts under the bundle, fifos, shim sockets, runc state and bundle
dirs, cgroups (``Containerd.leftovers``); shim processes of the family still alive (a Python
template is expected: it idles out by design, and is reported apart); socket files in
``/run/containerd/s`` that nobody holds; containerd's and the template's fd counts against the
start. Then, after containerd is stopped, what the harness had to remove by force and which
files in ``/run/containerd/s`` survive (a template must take its socket, pid and lock files
with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.procs import family_procs
from integration.harness import Containerd, Leftovers, orphan_sockets, wait_for

from .common import SHIMS, Ids, fd_count, log, remove_tasks
from .report import Section

NAME = "leak census"
KINDS = ("processes", "mounts", "fifos", "sockets", "runc_state", "cgroups")


@dataclass
class Baseline:
    containerd_fds: int | None
    template_pid: int | None
    template_fds: int | None

    @classmethod
    def take(cls, c: Containerd) -> "Baseline":
        tpl = c.template_pid()
        return cls(fd_count(c.pid) if c.pid else None, tpl, fd_count(tpl) if tpl else None)


def _shims_alive(c: Containerd) -> dict[str, list[int]]:
    fams = family_procs(c.address)
    return {s.family: sorted(p for p, kind in fams[s.family].items() if kind == "shim") for s in SHIMS}


def run(c: Containerd, ids: Ids, base: Baseline) -> Section:
    sec = Section(NAME)
    stray = sorted((set(c.tasks()) | c.containers()))
    if stray:
        sec.notes.append(f"containers a check left behind, removed before the census: {stray}")
        remove_tasks(c, stray)
    try:
        wait_for(lambda: not any(_shims_alive(c).values()), timeout=30, interval=0.2, message="shims to exit")
    except TimeoutError:
        pass
    alive = _shims_alive(c)
    found = {s.name: c.leftovers(sorted(ids.by_shim[s.name])) for s in SHIMS}
    orphans = orphan_sockets(c.new_shim_sockets())
    for kind in KINDS:
        vals = {s.name: getattr(found[s.name], kind) for s in SHIMS}
        if kind == "processes":
            vals = {s.name: {**vals[s.name], **{p: "shim still running" for p in alive[s.family]}} for s in SHIMS}
        if kind == "sockets":
            vals["python"] = sorted(set(vals["python"]) | {p for p in orphans if "py-template" in p})
            vals["go"] = sorted(set(vals["go"]) | {p for p in orphans if "py-template" not in p})
        sec.judged(f"after teardown: {kind.replace('_', ' ')} left", not vals["go"], not vals["python"],
                   _items(vals["go"]), _items(vals["python"]))
    sec.details["leftovers"] = {s.name: str(found[s.name]) for s in SHIMS}
    sec.details["ids"] = {s.name: len(ids.by_shim[s.name]) for s in SHIMS}
    now = fd_count(c.pid) if c.pid else None
    text = f"{base.containerd_fds} → {now}"
    sec.text("containerd fds: after warm-up → after teardown (shared by both)", text, text)
    tpl = c.template_pid()
    tpl_text = (f"pid {base.template_pid}: {base.template_fds} fds; now pid {tpl}: "
                f"{fd_count(tpl) if tpl else '—'} fds" + (" (a successor: the first was killed)"
                                                          if tpl != base.template_pid else ""))
    sec.text("Python template (alive by design, idles out after 600 s)", "n/a (no template)", tpl_text)
    log(f"census: {sum(len(getattr(found[s.name], k)) for s in SHIMS for k in KINDS)} leftovers, shims alive {alive}")
    return sec


def after_stop(sec: Section, forced: Leftovers, c: Containerd) -> None:
    """What ``Containerd.stop`` had to remove by force, and files left in /run/containerd/s."""
    per = {s.name: [] for s in SHIMS}
    for kind in ("containers", *KINDS):
        items = getattr(forced, kind)
        for item in (items.values() if isinstance(items, dict) else items):
            text = str(item)
            owner = "python" if ("-py" in text or "py-" in text) else "go" if "go-" in text else None
            for s in ([owner] if owner else per):
                per[s].append(f"{kind}: {text}")
    sec.judged("at containerd stop: removed by force", not per["go"], not per["python"],
               _items(per["go"]), _items(per["python"]))
    left = [os.path.basename(p) for p in c.new_shim_sockets()]
    py = [n for n in left if n.startswith("py-template")]
    other = [n for n in left if n not in py]
    sec.judged("after containerd stop: files left in /run/containerd/s", not other, not py, _items(other), _items(py))
    # Reported; now removed: they are this run's (a shim it started left them), and the
    # machine's socket directory is not the soak's to leave them in.
    for path in orphan_sockets(c.new_shim_sockets()):
        try:
            os.unlink(path)
        except OSError as e:
            log(f"census: could not remove {path}: {e}")


def _items(v) -> str:
    v = list(v.values()) if isinstance(v, dict) else list(v)
    if not v:
        return "none"
    return f"{len(v)}: " + "; ".join(str(x) for x in v[:3]) + (" …" if len(v) > 3 else "")
