"""Turn the raw results into latest.json (+ a timestamped copy), latest.md and latest.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

MiB = float(1 << 20)


# --------------------------------------------------------------------------
# columns: the variants of the run (bench/shims.py); every ratio is variant / go
# --------------------------------------------------------------------------

REFERENCE = "go"
DEFAULT_COLUMNS = [("go", "Go"), ("python", "Python")]  # results written before the variants existed
COLORS = {"go": "#4C72B0", "python": "#DD8452", "python-ns": "#55A868", "rust": "#C44E52"}


def columns(results: dict) -> list[tuple[str, str]]:
    """[(variant, label)] in column order, the reference (go) first."""
    vs = results.get("variants")
    return [(v["name"], v["label"]) for v in vs] if vs else list(DEFAULT_COLUMNS)


# --------------------------------------------------------------------------
# rows: (metric, {variant: value}, kind) with kind in mem | ms | us | s | mibs | n
# --------------------------------------------------------------------------

Row = tuple[str, dict[str, float | None], str]


def _each(d: dict, key: str) -> dict[str, float | None]:
    return {s: v.get(key) for s, v in d.items() if isinstance(v, dict) and key in v}


def rows(results: dict) -> list[Row]:
    out: list[Row] = []
    names = [n for n, _ in columns(results)]
    mem = results.get("memory") or {}
    for mode, by_n in mem.items():
        sizes = sorted(by_n, key=int, reverse=True)
        for n in sizes:
            r = by_n[n]
            present = [s for s in names if s in r]
            for key, label in (("rss", "Rss"), ("pss", "Pss"), ("uss", "USS")):
                out.append((f"memory, THP={mode}, {n} task{'s' if n != '1' else ''}/shim: {label} sum",
                            {s: r[s]["sum"][key] for s in present}, "mem"))
            out.append((f"memory, THP={mode}, {n} task{'s' if n != '1' else ''}/shim: processes",
                        {s: r[s]["count"] for s in present}, "n"))
        if len(sizes) == 2:
            big, one = by_n[sizes[0]], by_n[sizes[1]]
            extra = int(sizes[0]) - 1
            out.append((f"memory, THP={mode}: Pss per extra task",
                        {s: (big[s]["sum"]["pss"] - one[s]["sum"]["pss"]) / extra
                         for s in names if s in big and s in one}, "mem"))
    lat = results.get("latency") or {}
    if "run_rm" in lat:
        out.append(("latency: `ctr run --rm … /bin/true` median", _each(lat["run_rm"], "median_s"), "ms"))
        out.append(("latency: `ctr run --rm … /bin/true` p90", _each(lat["run_rm"], "p90_s"), "ms"))
    if "start" in lat:
        out.append(("latency: `ctr run -d … sleep` (task start) median", _each(lat["start"], "median_s"), "ms"))
        out.append(("latency: `ctr run -d … sleep` (task start) p90", _each(lat["start"], "p90_s"), "ms"))
    if "exec" in lat:
        out.append(("latency: `ctr task exec … /bin/true` median", _each(lat["exec"], "median_s"), "ms"))
        out.append(("latency: `ctr task exec … /bin/true` p90", _each(lat["exec"], "p90_s"), "ms"))
    if "burst" in lat:
        n = lat["burst"]["go"]["concurrency"]
        out.append((f"latency: {n} concurrent `ctr run -d`, wall", _each(lat["burst"], "median_wall_s"), "s"))
    if "ttrpc_state" in lat:
        out.append(("latency: ttrpc `Task/State` round trip median", _each(lat["ttrpc_state"], "median_s"), "us"))
        out.append(("latency: ttrpc `Task/State` round trip p90", _each(lat["ttrpc_state"], "p90_s"), "us"))
        state = lat["ttrpc_state"]
        if all(isinstance(v, dict) and "one_cpu" in v for v in state.values()):
            out.append(("latency: ttrpc `Task/State`, shim CPU time per call", _each(state, "cpu_per_call_s"), "us"))
            one = {s: v["one_cpu"] for s, v in state.items()}
            out.append(("latency: ttrpc `Task/State` round trip median, client and shim on one CPU",
                        _each(one, "median_s"), "us"))
            out.append(("latency: ttrpc `Task/State`, shim CPU time per call, on one CPU",
                        _each(one, "cpu_per_call_s"), "us"))
    tp = results.get("throughput") or {}
    if tp:
        mib = tp["mib"]
        out.append((f"throughput: {mib} MiB stdout, first byte→EOF (median)",
                    _each(tp, "median_stream_mib_s"), "mibs"))
        out.append((f"throughput: {mib} MiB stdout, whole `ctr run --rm` (median)",
                    _each(tp, "median_wall_mib_s"), "mibs"))
    pods = results.get("pods") or {}
    if pods:
        n = pods["pods_per_runtime"]
        ps = [s for s in names if isinstance(pods.get(s), dict) and "memory" in pods[s]]
        for key, label in (("rss", "Rss"), ("pss", "Pss"), ("uss", "USS")):
            out.append((f"pods (CRI), {n} pods/runtime running: {label} sum",
                        {s: pods[s]["memory"]["sum"][key] for s in ps}, "mem"))
        for key, label in (("median_s", "median"), ("p90_s", "p90")):
            out.append((f"pods (CRI): pod start (RunPodSandbox + CreateContainer + StartContainer) {label}",
                        {s: pods[s]["start"][key] for s in ps}, "ms"))
        out.append(("pods (CRI): shim processes per pod", {s: pods[s]["mean_shims_per_pod"] for s in ps}, "n"))
    if results.get("scale"):
        from .scale import rows as scale_rows

        out += scale_rows(results["scale"])
    return out


def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "mem":
        return f"{v / MiB:.1f} MiB"
    if kind == "ms":
        return f"{v * 1e3:.1f} ms"
    if kind == "us":
        return f"{v * 1e6:.0f} µs"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "mibs":
        return f"{v:.0f} MiB/s"
    if kind == "rate":
        return f"{v:.1f}/s"
    return f"{v:g}"


def ratio_value(go: float | None, other: float | None) -> float | None:
    if not go or other is None:
        return None
    return other / go


def ratio(go: float | None, other: float | None) -> str:
    r = ratio_value(go, other)
    return "—" if r is None else f"{r:.2f}×"


def markdown(results: dict) -> str:
    env = results["environment"]
    p = results["params"]
    cols = columns(results)
    others = [(s, label) for s, label in cols if s != REFERENCE]
    ref_label = dict(cols).get(REFERENCE, "Go")
    rust = (results.get("rust_shim") or {})
    lines = [
        f"# Shim benchmark: {', '.join(label for _, label in others)} vs {ref_label} ({env['date']})",
        "",
        (f"{env['cpus']} CPUs ({env['cpu']}), kernel {env['kernel']}, {env['containerd']}, "
         f"{env['runc']}, "
         f"Python {env['python']}; THP at start: {env['thp_enabled_original']}. "
         f"Run took {results['duration_s']:.0f} s{' (--quick)' if p['quick'] else ''}; load average "
         f"{_load(env.get('loadavg_at_start'))} at start, {_load(env.get('loadavg_at_end'))} at end"
         f"{' (other work on the machine: numbers are noisy)' if _busy(env) else ''}."),
        "",
        _parameters(p),
    ]
    if results.get("variants"):
        lines.append("Columns: " + "; ".join(_describe_variant(v) for v in results["variants"]) + ".  ")
        if rust.get("path"):
            found = f"`{rust['path']}`" + (f" ({rust['version']})" if rust.get("version") else "")
        else:
            found = rust.get("status", "not installed")
        lines.append(f"Rust shim: {found}.")
    lines += [
        ("Memory: sums over the processes serving each variant's tasks (+ the template for Python), "
         "smaps_rollup; Python ns is measured in a round of its own. Ratios = column / "
         f"{ref_label} (> 1: more memory / takes longer / — for throughput — moves more); "
         "— = not measured for that column."),
        "",
        ("| metric | " + " | ".join(label for _, label in cols) + " | "
         + " | ".join(f"{label} ÷ {ref_label}" for _, label in others) + " |"),
        "|---|" + "---:|" * (len(cols) + len(others)),
    ]
    for metric, vals, kind in rows(results):
        go = vals.get(REFERENCE)
        lines.append(f"| {metric} | " + " | ".join(fmt(vals.get(s), kind) for s, _ in cols) + " | "
                     + " | ".join(ratio(go, vals.get(s)) if kind != "n" else "" for s, _ in others) + " |")
    mem = results.get("memory") or {}
    first = True
    for mode, by_n in mem.items():
        n = max(by_n, key=int)
        for s, label in cols:
            py = by_n[n].get(s)
            if not s.startswith("python") or not py or "forked" not in py:
                continue
            if first:
                lines.append("")
                first = False
            lines.append(f"{label} at THP={mode}, {n} tasks: {py['count']} processes = "
                         f"{py['templates']} template(s), {py['forked']} shims forked from a template, "
                         f"{py['count'] - py['templates'] - py['forked']} exec'd"
                         + (f"; serving on {py['addresses']} socket(s)" if "addresses" in py else "") + ".  ")
    pods = results.get("pods") or {}
    if "python" in pods:
        py = pods["python"]["memory"]
        lines += ["", (f"Pods: handlers {pods['handlers']['go']} (Go) / {pods['handlers']['python']} (Python), "
                   f"each pod = sandbox + 1 busybox `sleep`, CNI bridge; started one after another, "
                   f"alternating, after 1 warm-up pod each. Python family with {pods['pods_per_runtime']} pods: "
                   f"{py['count']} processes = {py['templates']} template(s), {py['forked']} shims forked "
                   f"from a template, {py['count'] - py['templates'] - py['forked']} exec'd. "
                   f"The CRI containerd has no handler for the other columns.")]
    if results.get("scale"):
        from .scale import verdict_lines

        lines += ["", *verdict_lines(results["scale"])]
    if results.get("timeline"):
        from .timeline import table

        lines += ["", (f"Timeline of one task ({results['timeline']['rounds']} rounds per shim, the bench playing "
                       "containerd over ttrpc, overlay rootfs, our warm template; `bench/timeline.py`):"), ""]
        lines += table(results["timeline"])
    for sec, err in (results.get("errors") or {}).items():
        lines.append("")
        lines.append(f"**{sec} failed:** `{err.strip().splitlines()[-1] if err.strip() else err}`")
    ex = (results.get("latency") or {}).get("exec") or {}
    for shim, _ in cols:
        if "error" in ex.get(shim, {}):
            lines.append("")
            lines.append(f"exec on the {shim} shim failed: `{ex[shim]['error'][:300]}`")
    for left in results.get("peer_leftovers") or []:
        lines += ["", (f"Finding: {left['family']} shim(s) {left['pids']} stayed alive after their tasks were "
                       "deleted (killed by pid so the run could go on; the other columns are unaffected).")]
    if results.get("cleanup_leftovers"):
        lines += ["", f"Left over at containerd stop (removed): {results['cleanup_leftovers']}"]
    return "\n".join(lines) + "\n"


def _parameters(p: dict) -> str:
    if p.get("only") == ["scale"]:
        return (f"Parameters: {p['scale_tasks']} tasks, idle window {p['idle_window']} s, "
                f"{p['state_calls']} State calls, start concurrency {p['concurrency']}.")
    return (f"Parameters: {p['tasks']} tasks/shim, {p['runs']} latency runs/shim, burst {p['burst']} "
            f"x{p['burst_reps']}, {p['state_calls']} State calls, {p['throughput_mib']} MiB x{p['throughput_runs']}, "
            f"start concurrency {p['concurrency']}, settle {p['settle']} s"
            + (f", {p['pods']} CRI pods/runtime." if "pods" in p else "."))


def _describe_variant(v: dict) -> str:
    how = f"`--runtime {v['runtime']}`"
    if v.get("shim_group"):
        how += f" + `ShimGroup = \"{v['shim_group']}\"` (one shim for every task of the namespace)"
    return f"{v['label']} = {how}"


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _busy(env: dict) -> bool:
    """A 1-min load above half the CPUs at start or end: something else was running."""
    cpus = env.get("cpus") or 1
    return any(v and v[0] > cpus / 2 for v in (env.get("loadavg_at_start"), env.get("loadavg_at_end")))


def plot(results: dict, path: Path) -> bool:
    """Memory (Pss sum) and latency medians as grouped bars, and every variant's ratio to Go."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    cols = columns(results)
    names = [s for s, _ in cols]
    labels = dict(cols)
    mem = results.get("memory") or {}
    lat = results.get("latency") or {}
    pods = results.get("pods") or {}

    groups = []  # (label, {shim: Pss bytes})
    for m, by_n in mem.items():
        n = str(max(int(k) for k in by_n))
        groups.append((f"{n} tasks\nTHP={m}", {s: by_n[n][s]["sum"]["pss"] for s in names if s in by_n[n]}))
    if "python" in pods:
        groups.append((f"{pods['pods_per_runtime']} CRI pods\n(host THP)",
                       {s: pods[s]["memory"]["sum"]["pss"] for s in names
                        if isinstance(pods.get(s), dict) and "memory" in pods[s]}))
    items = []  # (label, {shim: seconds})
    for key, label, field in (("run_rm", "ctr run --rm\n(median)", "median_s"),
                              ("start", "ctr run -d\n(median)", "median_s"),
                              ("exec", "ctr task exec\n(median)", "median_s"),
                              ("burst", None, "median_wall_s"),
                              ("ttrpc_state", "ttrpc State\n(median)", "median_s")):
        if key in lat:
            title = label if label is not None else f"{lat['burst']['go']['concurrency']}× ctr run -d\n(wall)"
            items.append((title, {s: v for s, v in _each(lat[key], field).items() if v}))
    if "python" in pods:
        items.append(("CRI pod start\n(median)", {s: pods[s]["start"]["median_s"] for s in names
                                                  if isinstance(pods.get(s), dict) and "start" in pods[s]}))

    fig = plt.figure(figsize=(14, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 0.9])
    ax_m, ax_l, ax_r = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    _bars(ax_m, groups, names, labels, lambda v: v / MiB, lambda v: f"{v:.0f}")
    if groups:
        ax_m.set_ylabel("MiB (sum of Pss over the shim processes)")
        ax_m.set_title("Memory: all tasks / pods running (lower is better)")
    _bars(ax_l, items, names, labels, lambda v: v * 1e3, _ms_label)
    if items:
        ax_l.set_yscale("log")
        ax_l.set_ylabel("milliseconds (log scale)")
        ax_l.set_title("Latency (lower is better)")

    ratios = []  # (label, {shim: ratio to go}) for the shims other than go
    for label, d in groups + items:
        go = d.get(REFERENCE)
        rs = {s: ratio_value(go, v) for s, v in d.items() if s != REFERENCE}
        rs = {s: r for s, r in rs.items() if r}
        if rs:
            ratios.append((label.replace("\n", " ", 1), rs))
    others = [s for s in names if s != REFERENCE]
    _bars(ax_r, ratios, others, labels, lambda v: v, lambda v: f"{v:.2f}×")
    if ratios:
        ax_r.set_yscale("log")
        times = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}×")
        ax_r.yaxis.set_major_formatter(times)
        ax_r.yaxis.set_minor_formatter(times)
        ax_r.tick_params(axis="y", which="minor", labelsize=7)
        ax_r.axhline(1.0, color=COLORS[REFERENCE], linestyle="--", linewidth=1, label=f"{labels.get(REFERENCE)} = 1")
        ax_r.set_ylabel(f"ratio to {labels.get(REFERENCE, 'Go')} (log scale)")
        ax_r.set_title(f"Relative to the {labels.get(REFERENCE, 'Go')} shim (< 1: less memory / faster)")
        ax_r.legend(fontsize=8)
    env = results["environment"]
    rust = (results.get("rust_shim") or {})
    fig.suptitle(f"containerd-shim-runc-v2-py vs Go shim — {env['date']}, {env['cpus']} CPUs, "
                 f"kernel {env['kernel']}, {env.get('containerd') or ''}"
                 + ("" if rust.get("path") else f"; Rust shim: {rust.get('status', 'not installed')}"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax, groups: list, names: list[str], labels: dict, scale, label_fmt) -> None:
    """Grouped bars: one group per (label, {shim: value}), one bar per shim present in it."""
    if not groups:
        ax.set_axis_off()
        return
    width = 0.8 / max(1, len(names))
    for j, shim in enumerate(names):
        xs, vals = [], []
        for i, (_, d) in enumerate(groups):
            if d.get(shim) is not None:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                vals.append(scale(d[shim]))
        if not xs:
            continue
        bars = ax.bar(xs, vals, width, label=labels.get(shim, shim), color=COLORS.get(shim))
        ax.bar_label(bars, labels=[label_fmt(v) for v in vals], fontsize=7 if len(names) <= 3 else 6)
    ax.set_xticks(range(len(groups)), [t for t, _ in groups], fontsize=8)
    ax.legend(fontsize=8)


def _ms_label(v: float) -> str:
    if v <= 0:
        return "n/a"
    return f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def write(results: dict, outdir: Path) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, sort_keys=False) + "\n"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # a scale-only run (on request, heavy) does not replace the full run's latest.*
    scale_only = results["params"].get("only") == ["scale"]
    suffix = "-quick" if results["params"]["quick"] else ""
    suffix += "-scale" if scale_only else ""
    latest = "latest-scale" if scale_only else "latest"
    paths = {"json": outdir / f"{latest}.json", "copy": outdir / f"{stamp}{suffix}.json",
             "md": outdir / f"{latest}.md", "png": outdir / f"{latest}.png"}
    paths["json"].write_text(text)
    paths["copy"].write_text(text)
    paths["md"].write_text(markdown(results))
    if not plot(results, paths["png"]):
        del paths["png"]
    return paths
