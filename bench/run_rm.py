"""Just the ``ctr run --rm IMAGE ID /bin/true`` latency (kept for the top-level README).

    python -m bench.run_rm [-n 30]

The full suite is ``python -m bench`` (``make bench``); this runs only its
run --rm part and writes bench/results/run_rm.json in the old format.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from integration.harness import Containerd, build_busybox_image

from . import latency, procs

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30, help="runs per shim")
    args = ap.parse_args(argv)
    with Containerd(log_level="warn") as c:
        address = c.address
        try:
            tar = c.dir / "busybox-oci.tar"
            ref = build_busybox_image(tar)
            c.import_image(tar)
            r = latency.run_rm(c, ref, args.n)
        finally:
            procs.stop_templates(address)
    medians = {name: r[name]["median_s"] for name in ("python", "go")}
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
