"""The one table (check | Go | Python | verdict), its header, and latest.{md,json}.

A row is either judged (each shim passes or fails a stated bound: the verdict says who failed;
only a Python failure fails the run, Go is the reference) or measured (a number per shim: the
verdict is the ratio Python / Go).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    check: str
    go: str
    python: str
    verdict: str
    go_ok: bool | None = None  # None: measured, not judged
    py_ok: bool | None = None


@dataclass
class Section:
    """One check's rows, its raw figures (json only) and sentences for under the table."""

    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def judged(self, check: str, go_ok: bool | None, py_ok: bool | None, go: str, python: str) -> Row:
        row = Row(check, go, python, verdict(go_ok, py_ok), go_ok, py_ok)
        self.rows.append(row)
        return row

    def measured(self, check: str, go: float | None, py: float | None, fmt) -> Row:
        row = Row(check, fmt(go), fmt(py), ratio(go, py))
        self.rows.append(row)
        return row

    def text(self, check: str, go: str, python: str, note: str = "") -> Row:
        row = Row(check, go, python, note)
        self.rows.append(row)
        return row

    @property
    def python_failed(self) -> bool:
        return any(r.py_ok is False for r in self.rows)


def verdict(go_ok: bool | None, py_ok: bool | None) -> str:
    if go_ok is None:
        return "pass" if py_ok else "**FAIL (Python)**"
    if py_ok is None:
        return "pass" if go_ok else "fail (Go)"
    if go_ok and py_ok:
        return "both pass"
    if go_ok:
        return "**FAIL (Python)**"
    if py_ok:
        return "Go fails, Python passes"
    return "**both fail**"


def ratio(go: float | None, py: float | None) -> str:
    """Python / Go, the way the bench reports it."""
    if go is None or py is None:
        return "—"
    if go == 0:
        return "Python = Go" if py == 0 else "—"
    return f"{py / go:.2f}× Go"


def _env_lines(env: dict, params: dict, duration: float) -> list[str]:
    mem = env.get("mem_total_bytes")
    return [
        f"Machine: {env.get('cpus')} CPUs ({env.get('cpu')}), {mem / (1 << 30):.0f} GiB, {env.get('os')}, "
        f"kernel {env.get('kernel')}.  " if mem else f"Machine: {env.get('cpus')} CPUs, kernel {env.get('kernel')}.  ",
        f"{env.get('containerd')}; {env.get('runc')}; Go shim: {env.get('go_shim') or '?'}; "
        f"Python {env.get('python')}; commit {str(env.get('git_commit'))[:12]}"
        f"{' (uncommitted changes)' if env.get('git_status') else ''}.  ",
        f"Run: {env.get('date')}, {duration / 60:.1f} min{' (--quick)' if params.get('quick') else ''}; "
        f"load average {_load(env.get('loadavg_at_start'))} at start, {_load(env.get('loadavg_at_end'))} at end.  ",
        "Parameters: " + ", ".join(f"{k}={v}" for k, v in params.items() if k != "quick") + ".",
    ]


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def markdown(results: dict) -> str:
    lines = [f"# Soak: Python shim vs Go shim ({results['environment'].get('date')})", ""]
    lines += _env_lines(results["environment"], results["params"], results["duration_s"])
    lines += ["", "| check | Go | Python | verdict |", "|---|---|---|---|"]
    for sec in results["sections"]:
        for r in sec["rows"]:
            lines.append(f"| {sec['name']}: {r['check']} | {_cell(r['go'])} | {_cell(r['python'])} | {r['verdict']} |")
    notes = [(s["name"], n) for s in results["sections"] for n in s["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {name}: {n}" for name, n in notes]
    for name, err in (results.get("errors") or {}).items():
        last = err.strip().splitlines()[-1] if err.strip() else err
        lines += ["", f"**{name} did not complete:** `{last}`"]
    failed = [s["name"] for s in results["sections"] if any(r["py_ok"] is False for r in s["rows"])]
    lines += ["", "Python failed: " + (", ".join(failed) if failed else "nothing") + "."]
    return "\n".join(lines) + "\n"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def as_dict(sections: list[Section]) -> list[dict]:
    return [{"name": s.name, "rows": [asdict(r) for r in s.rows], "details": s.details, "notes": s.notes}
            for s in sections]


def write(results: dict, outdir: Path) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, default=str) + "\n"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = "-quick" if results["params"].get("quick") else ""
    paths = {"json": outdir / "latest.json", "copy": outdir / f"{stamp}{suffix}.json", "md": outdir / "latest.md"}
    paths["json"].write_text(text)
    paths["copy"].write_text(text)
    paths["md"].write_text(markdown(results))
    return paths
