"""Soak the Go shim and this shim side by side in one private containerd; print one table.

    python -m soak [--quick] [--only churn,restart,...] [--runs 1000] [--execs 10000] ...

Writes soak/results/latest.{md,json} and a timestamped copy of the json. Needs root.
Sections run in order; the leak census always runs last, after every container was removed.
Exit status 1 if any Python check failed or a section could not complete; Go's results are
reported, never fatal (Go is the reference).
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

from bench import environment
from integration.harness import Containerd, build_busybox_image

from . import census, churn, fuzz, hostile, kills, report, restart, stuck
from .common import SHIMS, Ids, ctr_or_raise, log, run_args

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("churn", "restart", "kills", "stuck", "hostile", "fuzz")
FULL = dict(runs=1000, execs=10000, sample_every=1000, restart_tasks=20, outage=60.0, outage_exits=5,
            connections=1000, pipelined=10000, fuzz_frames=100000)
QUICK = dict(runs=40, execs=300, sample_every=100, restart_tasks=4, outage=5.0, outage_exits=2,
             connections=100, pipelined=1000, fuzz_frames=5000)
NAMESPACE = "soak"


HELP = dict(runs="sequential ctr run --rm per shim", execs="execs into one task per shim",
            sample_every="execs between the exec target's fd/Pss samples",
            restart_tasks="tasks per shim across containerd restarts",
            outage="seconds containerd stays down after its SIGKILL", outage_exits="tasks per shim exiting meanwhile",
            connections="idle connections held open on a shim", pipelined="requests pipelined, replies never read",
            fuzz_frames="fuzzed frames per shim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--only", default=",".join(SECTIONS), help="subset of: " + ",".join(SECTIONS))
    for key, text in HELP.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(FULL[key]), help=f"{text} ({FULL[key]})")
    ap.add_argument("--seed", type=int, default=11, help="fuzzer seed (11)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    vars(args).update({k: v for k, v in (QUICK if args.quick else FULL).items() if getattr(args, k) is None})
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if set(args.only) - set(SECTIONS):
        ap.error(f"--only: unknown {sorted(set(args.only) - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if min(args.runs, args.execs, args.sample_every, args.restart_tasks, args.connections, args.pipelined,
           args.fuzz_frames) < 1 or not 0 <= args.outage_exits <= args.restart_tasks:
        ap.error("counts must be >= 1 (and --outage-exits <= --restart-tasks)")
    return args


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_section(name: str, c: Containerd, ids: Ids, args: argparse.Namespace):
    if name == "churn":
        return churn.run(c, ids, args.runs, args.execs, args.sample_every)
    if name == "restart":
        return restart.run(c, ids, args.restart_tasks, args.outage_exits, args.outage)
    if name == "kills":
        return kills.run(c, ids)
    if name == "stuck":
        return stuck.run(c, ids)
    if name == "hostile":
        return hostile.run(c, ids, args.connections, args.pipelined)
    return fuzz.run(c, ids, args.fuzz_frames, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return soak(args)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); cleaned up")
        return 130


def soak(args: argparse.Namespace) -> int:
    for sig in INTERRUPTS:  # each ends the run through the finally: blocks below (KeyboardInterrupt)
        signal.signal(sig, signal.default_int_handler)
    os.environ.pop("SHIM_PY_GROUP", None)  # the default (per-task) mode is what is compared
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # hostile clients hold many sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    t0 = time.monotonic()
    params = {k: getattr(args, k) for k in (*FULL, "seed", "quick")} | {"only": args.only}
    results: dict = {"params": params, "environment": environment.collect(None), "errors": {}}
    sections: list[report.Section] = []
    ids = Ids()
    c = Containerd(log_level="info", namespace=NAMESPACE)
    try:
        c.start()
        log(f"containerd at {c.address}")
        tar = c.dir / "busybox-oci.tar"
        c.image_ref = build_busybox_image(tar)
        c.import_image(tar)
        for s in SHIMS:  # unpack the image; the Python shim's template starts here
            ctr_or_raise(c, "run", "--rm", *run_args(s), c.image_ref, ids.new(s, "warm"), "true")
        baseline = census.Baseline.take(c)
        for name in args.only:
            log(f"== {name}")
            try:
                sections.append(run_section(name, c, ids, args))
            except Exception:  # noqa: BLE001 - record it and go on with the next check
                results["errors"][name] = traceback.format_exc()
                log(f"{name} did not complete:\n{results['errors'][name]}")
        log("== census")
        sections.append(census.run(c, ids, baseline))
    finally:
        for sig in INTERRUPTS:  # the cleanup runs to its end (bounded by timeouts)
            signal.signal(sig, signal.SIG_IGN)
        log("stopping containerd")
        address = c.address if c.dir is not None else None
        forced = c.stop()
        if address is not None and sections and sections[-1].name == census.NAME:
            census.after_stop(sections[-1], forced, c)
    results["sections"] = report.as_dict(sections)
    results["environment"]["loadavg_at_end"] = os.getloadavg()
    results["duration_s"] = time.monotonic() - t0
    paths = report.write(results, args.results_dir)
    print(report.markdown(results))
    for p in paths.values():
        log(f"wrote {p}")
    return 1 if results["errors"] or any(s.python_failed for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
