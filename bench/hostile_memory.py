"""Memory a shim gives back after hostile clients (issue 16): a measurement, not a test.

    python -m bench.hostile_memory [--connections 1000] [--pipelined 10000] [--rounds 1] [--namespace]

One task on this shim in a private containerd; the shim's Rss before, during and after
soak's hostile clients (idle connections held open, then requests pipelined by a client
that never reads a reply), with both peers gone. ``--namespace``: the task's shim is a
namespace shim (ShimGroup = "namespace": malloc, and memory given back after disconnects);
else a per-task shim (pymalloc). Run under /tmp/heavy.lock (root).
"""

from __future__ import annotations

import argparse
import json
import time

from integration.harness import Containerd, build_busybox_image, oci_runtime_binary
from soak.common import address_of, memory, remove_tasks, serving_pid, wait_status
from soak.hostile import idle_connections, pipelined

SETTLE = 3.0  # after the peers left: time for the shim to close and free what they held


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hostile_memory")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--pipelined", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--namespace", action="store_true", help="a namespace shim (ShimGroup = \"namespace\")")
    args = p.parse_args()
    c = Containerd(log_level="info").start()
    try:
        tar = c.dir / "busybox-oci.tar"  # type: ignore[operator]
        c.image_ref = build_busybox_image(tar)
        c.import_image(tar)
        name = "hostile-mem"
        runtime = ["--runtime", "io.containerd.runc.v2-py"]
        if args.namespace:
            config = c.dir / "namespace.toml"  # type: ignore[operator]
            config.write_text(f'ShimGroup = "namespace"\nBinaryName = {json.dumps(oci_runtime_binary())}\n')
            runtime += ["--runtime-config-path", str(config)]
        c.ctr("run", "-d", *runtime, c.image_ref, name, "sleep", "100000")
        wait_status(c, [name], "RUNNING")
        path, pid = address_of(c, name), serving_pid(c, name)
        start = memory(pid)["rss"]  # type: ignore[index]
        print(f"shim {pid}: Rss at start {mib(start)}")
        for r in range(args.rounds):
            idle = idle_connections(path, pid, name, c.namespace, args.connections)
            piped = pipelined(path, pid, name, c.namespace, args.pipelined)
            time.sleep(SETTLE)
            after = memory(pid)["rss"]  # type: ignore[index]
            print(f"round {r + 1}: idle {mib(idle['rss_during'])} during; pipelined {mib(piped['rss_during'])} "
                  f"during; after both left {mib(after)} ({(after - start) / 2**20:+.1f} MiB vs start)")
        remove_tasks(c, [name])
    finally:
        c.stop()


if __name__ == "__main__":
    main()
