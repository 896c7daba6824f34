"""Benchmark this shim (container mode and namespace mode) against the Go shim (containerd-shim-runc-v2), and the Rust shim if installed, in one private containerd.

    python -m bench [--quick] [--only memory,latency,throughput,pods] [--tasks 100] [--runs 30] ...
    python -m bench --only scale --scale-tasks 1000 [--idle-window 60]   # on request only (heavy)
    BENCH_RUST_SHIM=/path/to/containerd-shim-runc-v2-rs python -m bench ...

Writes bench/results/latest.{json,md,png} and a timestamped copy of the json.
Needs root (containerd, THP policy).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

from integration.harness import Containerd, build_busybox_image

from . import environment, latency, memory, pods, procs, report, scale, shims, tasks, throughput, timeline
from .tasks import SHIMS, log
from .thp import ThpGuard

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("memory", "latency", "throughput", "pods", "timeline")
#: only when asked for by --only: 1000 tasks per variant takes ~10 min and ~3 GiB
ON_REQUEST = ("scale",)
ALL_SECTIONS = SECTIONS + ON_REQUEST
CTR_SECTIONS = ("memory", "latency", "throughput", "scale")  # the ones that use the plain containerd
FULL = dict(tasks=100, runs=30, settle=2.0, burst=50, burst_reps=2, state_calls=1000,
            throughput_mib=256, throughput_runs=3, pods=20, timeline_rounds=15)
QUICK = dict(tasks=10, runs=5, settle=1.0, burst=10, burst_reps=1, state_calls=200,
             throughput_mib=32, throughput_runs=2, pods=5, timeline_rounds=3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help="comma-separated subset of: " + ",".join(ALL_SECTIONS)
                    + " (default: all but " + ",".join(ON_REQUEST) + ")")
    ap.add_argument("--tasks", type=int, help=f"detached tasks per shim for memory (default {FULL['tasks']})")
    ap.add_argument("--runs", type=int, help=f"run --rm / exec samples per shim (default {FULL['runs']})")
    ap.add_argument("--concurrency", type=int, default=4, help="parallel ctr run -d when starting tasks (4)")
    ap.add_argument("--settle", type=float, help=f"seconds between all-RUNNING and measuring ({FULL['settle']})")
    ap.add_argument("--burst", type=int, help=f"concurrent ctr run -d in the burst ({FULL['burst']})")
    ap.add_argument("--burst-reps", type=int, help=f"bursts per shim ({FULL['burst_reps']})")
    ap.add_argument("--state-calls", type=int, help=f"ttrpc State calls per shim ({FULL['state_calls']})")
    ap.add_argument("--throughput-mib", type=int, help=f"MiB written to stdout ({FULL['throughput_mib']})")
    ap.add_argument("--throughput-runs", type=int, help=f"throughput runs per shim ({FULL['throughput_runs']})")
    ap.add_argument("--pods", type=int, help=f"CRI pods per runtime handler (default {FULL['pods']})")
    ap.add_argument("--timeline-rounds", type=int,
                    help=f"task lifecycles per shim in the phase timeline (default {FULL['timeline_rounds']})")
    ap.add_argument("--scale-tasks", type=int, default=1000,
                    help="scale: tasks in the one namespace-mode shim, and Go shims (1000)")
    ap.add_argument("--idle-window", type=float, default=60.0,
                    help="scale: seconds over which idle CPU is measured (60)")
    ap.add_argument("--thp-modes", default="madvise,always",
                    help="THP policies for the memory rounds; '' = leave the host's policy alone")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    profile = QUICK if args.quick else FULL
    for k, v in profile.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in ALL_SECTIONS]
    if bad or not args.only:
        ap.error(f"--only: unknown section(s) {bad}; choose from {','.join(ALL_SECTIONS)}")
    args.thp_modes = [m.strip() for m in args.thp_modes.split(",") if m.strip()]
    if os.environ.get(shims.RUST_ENV, "").strip() and "rust" not in shims.BY_NAME:
        ap.error(f"Rust shim: {shims.RUST_STATUS}")
    if args.tasks < 1 or args.runs < 1 or args.burst < 1 or args.state_calls < 1 or args.throughput_runs < 1 \
            or args.pods < 1 or args.timeline_rounds < 1 or args.scale_tasks < 1 or args.idle_window <= 0:
        ap.error("counts must be >= 1")
    return args


# -- interruption: the first SIGINT/SIGTERM/SIGHUP aborts the run; later ones cannot cut the cleanup short --

_cleaning = False


def _on_signal(signum: int, _frame) -> None:
    global _cleaning
    if _cleaning:
        log(f"signal {signum} during cleanup: ignored, still cleaning up (bounded by timeouts)")
        return
    _cleaning = True  # from here on every finally: block runs to its end
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def main(argv: list[str] | None = None) -> int:
    global _cleaning
    args = parse_args(argv)
    _install_signal_handlers()
    group = os.environ.pop(shims.SHIM_GROUP_ENV, None)
    if group:  # the harness would put every run of our runtime in that group: the bench chooses per variant
        log(f"ignoring ${shims.SHIM_GROUP_ENV}={group}: the bench runs the python shim in both modes itself")
    log("variants: " + ", ".join(f"{v.name} (--runtime {v.runtime}"
                                 + (f", ShimGroup={v.shim_group}" if v.shim_group else "") + ")"
                                 for v in shims.VARIANTS) + f"; Rust shim: {shims.RUST_STATUS}")
    t_start = time.monotonic()
    thp = ThpGuard()
    modes = args.thp_modes
    if "memory" in args.only and modes and not thp.can_set():
        log(f"cannot change {thp.path} (not root?): memory measured at the current policy only")
        modes = []
    results: dict = {
        "params": {k: getattr(args, k) for k in (*FULL, "quick", "only", "concurrency", "scale_tasks", "idle_window")} | {"thp_modes": modes},
        "environment": environment.collect(thp.original),
        **shims.describe(),
        "errors": {},
    }
    # scale: our shims start under containerd 2.x's soft open-file limit (the Go shim raises its own)
    nofile = (scale.SOFT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]) if "scale" in args.only else None
    c = Containerd(log_level="warn", shim_nofile=nofile)
    try:
        try:
            ref = ""
            if any(s in args.only for s in CTR_SECTIONS):
                c.start()
                log(f"containerd at {c.address}")
                tar = c.dir / "busybox-oci.tar"
                ref = build_busybox_image(tar)
                c.import_image(tar)
                for shim in SHIMS:  # unpack the image, warm the page cache
                    latency.run_rm_once(c, ref, shim, f"warm-{shim}")
            for section in ALL_SECTIONS:
                if section not in args.only:
                    continue
                try:
                    if section == "memory":
                        try:
                            results["memory"] = memory.run(c, ref, thp, modes, args.tasks,
                                                           args.concurrency, args.settle)
                        finally:
                            thp.restore()  # the other sections run at the host's own policy
                    elif section == "latency":
                        results["latency"] = latency.run(c, ref, args.runs, args.burst,
                                                         args.burst_reps, args.state_calls)
                    elif section == "throughput":
                        results["throughput"] = throughput.run(c, ref, args.throughput_mib,
                                                               args.throughput_runs)
                    elif section == "pods":
                        if c.dir is not None:  # the plain containerd's warm template would share pages
                            procs.stop_templates(c.address)
                        results["pods"] = pods.run(args.pods, args.settle)
                    elif section == "scale":
                        results["scale"] = scale.run(c, ref, args.scale_tasks, args.concurrency,
                                                     args.idle_window, args.state_calls)
                    elif section == "timeline":  # plays containerd itself: no containerd involved
                        results["timeline"] = timeline.run(args.timeline_rounds)
                except Exception:  # noqa: BLE001 - record, go on with the next section
                    results["errors"][section] = traceback.format_exc()
                    log(f"{section} FAILED:\n{results['errors'][section]}")
        finally:
            _cleaning = True
            log("stopping containerd, cleaning up")
            address = c.address if c.dir is not None else None
            left = c.stop()
            if left:
                results["cleanup_leftovers"] = str(left)
                log(f"left over at containerd stop (removed): {left}")
            if address is not None:
                killed = procs.stop_templates(address)
                if killed:
                    log(f"stopped python shim template(s) {killed}")
    finally:
        _cleaning = True
        restored = thp.restore()
        log(f"THP policy {'restored to' if restored else 'NOT restored to'} {thp.original} "
            f"(now {thp.current})")
    results["thp_restored"] = restored
    results["peer_leftovers"] = tasks.PEER_LEFTOVERS
    results["environment"]["thp_enabled_at_end"] = thp.current
    results["environment"]["loadavg_at_end"] = os.getloadavg()
    results["duration_s"] = time.monotonic() - t_start
    paths = report.write(results, args.results_dir)
    print(report.markdown(results))
    for p in paths.values():
        log(f"wrote {p}")
    return 1 if results["errors"] or not restored else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); everything was cleaned up")
        sys.exit(130)
