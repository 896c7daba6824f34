"""Turn the raw results into latest.json (+ a timestamped copy), latest.md and latest.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

MiB = float(1 << 20)


# --------------------------------------------------------------------------
# rows: (metric, go, python, kind) with kind in mem | ms | us | s | mibs | n
# --------------------------------------------------------------------------

def rows(results: dict) -> list[tuple[str, float | None, float | None, str]]:
    out: list[tuple[str, float | None, float | None, str]] = []
    mem = results.get("memory") or {}
    for mode, by_n in mem.items():
        sizes = sorted(by_n, key=int, reverse=True)
        for n in sizes:
            r = by_n[n]
            for key, label in (("rss", "Rss"), ("pss", "Pss"), ("uss", "USS")):
                out.append((f"memory, THP={mode}, {n} task{'s' if n != '1' else ''}/shim: {label} sum",
                            r["go"]["sum"][key], r["python"]["sum"][key], "mem"))
        if len(sizes) == 2:
            big, one = by_n[sizes[0]], by_n[sizes[1]]
            extra = int(sizes[0]) - 1
            out.append((f"memory, THP={mode}: Pss per extra task",
                        (big["go"]["sum"]["pss"] - one["go"]["sum"]["pss"]) / extra,
                        (big["python"]["sum"]["pss"] - one["python"]["sum"]["pss"]) / extra, "mem"))
    lat = results.get("latency") or {}

    def pair(d: dict, key: str) -> tuple[float | None, float | None]:
        return tuple(d.get(s, {}).get(key) for s in ("go", "python"))  # type: ignore[return-value]

    if "run_rm" in lat:
        out.append(("latency: `ctr run --rm … /bin/true` median", *pair(lat["run_rm"], "median_s"), "ms"))
        out.append(("latency: `ctr run --rm … /bin/true` p90", *pair(lat["run_rm"], "p90_s"), "ms"))
    if "exec" in lat:
        out.append(("latency: `ctr task exec … /bin/true` median", *pair(lat["exec"], "median_s"), "ms"))
        out.append(("latency: `ctr task exec … /bin/true` p90", *pair(lat["exec"], "p90_s"), "ms"))
    if "burst" in lat:
        n = lat["burst"]["go"]["concurrency"]
        out.append((f"latency: {n} concurrent `ctr run -d`, wall", *pair(lat["burst"], "median_wall_s"), "s"))
    if "ttrpc_state" in lat:
        out.append(("latency: ttrpc `Task/State` round trip median", *pair(lat["ttrpc_state"], "median_s"), "us"))
        out.append(("latency: ttrpc `Task/State` round trip p90", *pair(lat["ttrpc_state"], "p90_s"), "us"))
    tp = results.get("throughput") or {}
    if tp:
        mib = tp["mib"]
        out.append((f"throughput: {mib} MiB stdout, first byte→EOF (median)",
                    *pair(tp, "median_stream_mib_s"), "mibs"))
        out.append((f"throughput: {mib} MiB stdout, whole `ctr run --rm` (median)",
                    *pair(tp, "median_wall_mib_s"), "mibs"))
    pods = results.get("pods") or {}
    if pods:
        n = pods["pods_per_runtime"]
        for key, label in (("rss", "Rss"), ("pss", "Pss"), ("uss", "USS")):
            out.append((f"pods (CRI), {n} pods/runtime running: {label} sum",
                        *(pods[s]["memory"]["sum"][key] for s in ("go", "python")), "mem"))
        for key, label in (("median_s", "median"), ("p90_s", "p90")):
            out.append((f"pods (CRI): pod start (RunPodSandbox + CreateContainer + StartContainer) {label}",
                        *(pods[s]["start"][key] for s in ("go", "python")), "ms"))
        out.append(("pods (CRI): shim processes per pod",
                    *(pods[s]["mean_shims_per_pod"] for s in ("go", "python")), "n"))
    return out


def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "n/a"
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
    return f"{v:g}"


def ratio(go: float | None, py: float | None) -> str:
    if not go or py is None:
        return "n/a"
    return f"{py / go:.2f}×"


def markdown(results: dict) -> str:
    env = results["environment"]
    p = results["params"]
    lines = [
        f"# Shim benchmark: python / go ({env['date']})",
        "",
        f"{env['cpus']} CPUs ({env['cpu']}), kernel {env['kernel']}, {env['containerd']}, "
        f"{env['runc']}, "
        f"Python {env['python']}; THP at start: {env['thp_enabled_original']}. "
        f"Run took {results['duration_s']:.0f} s{' (--quick)' if p['quick'] else ''}; load average "
        f"{_load(env.get('loadavg_at_start'))} at start, {_load(env.get('loadavg_at_end'))} at end"
        f"{' (other work on the machine: numbers are noisy)' if _busy(env) else ''}.",
        "",
        f"Parameters: {p['tasks']} tasks/shim, {p['runs']} latency runs/shim, burst {p['burst']} "
        f"x{p['burst_reps']}, {p['state_calls']} State calls, {p['throughput_mib']} MiB x{p['throughput_runs']}, "
        f"start concurrency {p['concurrency']}, settle {p['settle']} s"
        + (f", {p['pods']} CRI pods/runtime." if "pods" in p else "."),
        "Memory: sums over every process of the family (smaps_rollup); ratio = python / go "
        "(> 1: python uses more memory / takes longer / — for throughput — moves more).",
        "",
        "| metric | Go | Python | ratio |",
        "|---|---:|---:|---:|",
    ]
    for metric, go, py, kind in rows(results):
        lines.append(f"| {metric} | {fmt(go, kind)} | {fmt(py, kind)} | {ratio(go, py)} |")
    mem = results.get("memory") or {}
    for mode, by_n in mem.items():
        n = max(by_n, key=int)
        py = by_n[n]["python"]
        if "forked" in py:
            if not lines[-1].startswith("Python family"):
                lines.append("")
            lines.append(f"Python family at THP={mode}, {n} tasks: {py['count']} processes = "
                         f"{py['templates']} template(s), {py['forked']} shims forked from a template, "
                         f"{py['count'] - py['templates'] - py['forked']} exec'd.  ")
    pods = results.get("pods") or {}
    if "python" in pods:
        py = pods["python"]["memory"]
        lines += ["", f"Pods: handlers {pods['handlers']['go']} (Go) / {pods['handlers']['python']} (Python), "
                  f"each pod = sandbox + 1 busybox `sleep`, CNI bridge; started one after another, "
                  f"alternating, after 1 warm-up pod each. Python family with {pods['pods_per_runtime']} pods: "
                  f"{py['count']} processes = {py['templates']} template(s), {py['forked']} shims forked "
                  f"from a template, {py['count'] - py['templates'] - py['forked']} exec'd."]
    for sec, err in (results.get("errors") or {}).items():
        lines.append("")
        lines.append(f"**{sec} failed:** `{err.strip().splitlines()[-1] if err.strip() else err}`")
    ex = (results.get("latency") or {}).get("exec") or {}
    for shim in ("go", "python"):
        if "error" in ex.get(shim, {}):
            lines.append("")
            lines.append(f"exec on the {shim} shim failed: `{ex[shim]['error'][:300]}`")
    if results.get("cleanup_leftovers"):
        lines += ["", f"Left over at containerd stop (removed): {results['cleanup_leftovers']}"]
    return "\n".join(lines) + "\n"


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _busy(env: dict) -> bool:
    """A 1-min load above half the CPUs at start or end: something else was running."""
    cpus = env.get("cpus") or 1
    return any(v and v[0] > cpus / 2 for v in (env.get("loadavg_at_start"), env.get("loadavg_at_end")))


def plot(results: dict, path: Path) -> bool:
    """Grouped bars: memory (Pss sum: N tasks per THP mode, CRI pods) | latency (ms, log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"go": "#4C72B0", "python": "#DD8452"}
    mem = results.get("memory") or {}
    lat = results.get("latency") or {}
    pods = results.get("pods") or {}
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(13, 5.2))
    width = 0.38

    groups = []  # (label, {shim: Pss bytes})
    for m, by_n in mem.items():
        n = str(max(int(k) for k in by_n))
        groups.append((f"{n} tasks\nTHP={m}", {s: by_n[n][s]["sum"]["pss"] for s in ("go", "python")}))
    if "python" in pods:
        groups.append((f"{pods['pods_per_runtime']} CRI pods\n(host THP)",
                       {s: pods[s]["memory"]["sum"]["pss"] for s in ("go", "python")}))
    if groups:
        for j, shim in enumerate(("go", "python")):
            vals = [g[shim] / MiB for _, g in groups]
            xs = [i + (j - 0.5) * width for i in range(len(groups))]
            bars = ax_m.bar(xs, vals, width, label=shim, color=colors[shim])
            ax_m.bar_label(bars, fmt="%.0f", fontsize=8)
        ax_m.set_xticks(range(len(groups)), [t for t, _ in groups], fontsize=9)
        ax_m.set_ylabel("MiB (sum of Pss over the shim processes)")
        ax_m.set_title("Memory: all tasks / pods running (lower is better)")
        ax_m.legend()
    else:
        ax_m.set_axis_off()

    items = []
    if "run_rm" in lat:
        items.append(("ctr run --rm\n(median)", lat["run_rm"], "median_s"))
    if "exec" in lat:
        items.append(("ctr task exec\n(median)", lat["exec"], "median_s"))
    if "burst" in lat:
        items.append((f"{lat['burst']['go']['concurrency']}× ctr run -d\n(wall)", lat["burst"], "median_wall_s"))
    if "ttrpc_state" in lat:
        items.append(("ttrpc State\n(median)", lat["ttrpc_state"], "median_s"))
    if "python" in pods:
        items.append(("CRI pod start\n(median)", {s: pods[s]["start"] for s in ("go", "python")}, "median_s"))
    if items:
        for j, shim in enumerate(("go", "python")):
            vals = [(d.get(shim, {}).get(k) or 0) * 1e3 for _, d, k in items]
            xs = [i + (j - 0.5) * width for i in range(len(items))]
            bars = ax_l.bar(xs, vals, width, label=shim, color=colors[shim])
            ax_l.bar_label(bars, labels=[_ms_label(v) for v in vals], fontsize=8)
        ax_l.set_yscale("log")
        ax_l.set_xticks(range(len(items)), [t for t, _, _ in items], fontsize=9)
        ax_l.set_ylabel("milliseconds (log scale)")
        ax_l.set_title("Latency (lower is better)")
        ax_l.legend()
    else:
        ax_l.set_axis_off()
    env = results["environment"]
    fig.suptitle(f"containerd-shim-runc-v2-py vs Go shim — {env['date']}, {env['cpus']} CPUs, "
                 f"kernel {env['kernel']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ms_label(v: float) -> str:
    if v <= 0:
        return "n/a"
    return f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def write(results: dict, outdir: Path) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, sort_keys=False) + "\n"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = "-quick" if results["params"]["quick"] else ""
    paths = {"json": outdir / "latest.json", "copy": outdir / f"{stamp}{suffix}.json",
             "md": outdir / "latest.md", "png": outdir / "latest.png"}
    paths["json"].write_text(text)
    paths["copy"].write_text(text)
    paths["md"].write_text(markdown(results))
    if not plot(results, paths["png"]):
        del paths["png"]
    return paths
