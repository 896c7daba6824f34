"""Demo: run one container through the Python shim on a private containerd.

    python -m integration.demo [--runtime io.containerd.runc.v2-py]

Exit code = the container's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys

from integration.harness import PY_RUNTIME, Containerd, build_busybox_image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m integration.demo")
    ap.add_argument("--runtime", default=os.environ.get("SHIM_RUNTIME", PY_RUNTIME))
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("demo needs root", file=sys.stderr)
        return 2
    cid = f"demo-{os.getpid()}"
    c = Containerd(log_level=args.log_level)
    c.start()
    try:
        print(f"containerd {c.address} (log {c.log_path})")
        tar = c.dir / "busybox-oci.tar"
        ref = build_busybox_image(tar)
        c.import_image(tar)
        print(f"$ ctr run --rm --runtime {args.runtime} {ref} {cid} sh -c '...'")
        r = c.ctr("run", "--rm", "--runtime", args.runtime, ref, cid, "sh", "-c",
                  "echo hello from the python shim; uname -a", check=False, timeout=120)
        sys.stdout.write(r.stdout)
        if r.stderr:
            sys.stderr.write(r.stderr)
        print(f"exit code: {r.returncode}")
        if r.returncode != 0 and r.stderr:
            print("--- containerd log tail ---", file=sys.stderr)
            print(c.log_tail(20), file=sys.stderr)
        return r.returncode
    finally:
        report = c.stop()
        if report:
            print(f"cleaned up leftovers: {report}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
