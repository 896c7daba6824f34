"""Latency of ``ctr run --rm IMAGE ID /bin/true``: this shim vs the Go shim, same containerd, interleaved.

    python -m bench.run_rm [-n 30]

Prints the medians and their ratio and writes bench/results/run_rm.json.
The shims alternate run by run so that drift on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from integration.harness import GO_RUNTIME, PY_RUNTIME, Containerd, build_busybox_image

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(c: Containerd, runtime: str, ref: str, cid: str) -> float:
    t0 = time.perf_counter()
    r = c.ctr("run", "--rm", "--runtime", runtime, ref, cid, "/bin/true", check=False, timeout=120)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{runtime}: ctr run failed ({r.returncode}): {r.stderr.strip()}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30, help="runs per shim")
    args = ap.parse_args(argv)
    runtimes = {"python": PY_RUNTIME, "go": GO_RUNTIME}
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    with Containerd(log_level="warn") as c:
        tar = c.dir / "busybox-oci.tar"
        ref = build_busybox_image(tar)
        c.import_image(tar)
        for name, runtime in runtimes.items():  # warm-up, not counted
            one_run(c, runtime, ref, f"warm-{name}")
        for i in range(args.n):
            for name, runtime in runtimes.items():
                times[name].append(one_run(c, runtime, ref, f"b{os.getpid()}-{name}-{i}"))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "ctr run --rm /bin/true",
        "runs_per_shim": args.n,
        "median_s": medians,
        "ratio_python_to_go": medians["python"] / medians["go"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run_rm.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, m in medians.items():
        print(f"{name:7s} median {m * 1000:7.1f} ms")
    print(f"ratio python/go: {result['ratio_python_to_go']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
