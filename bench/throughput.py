"""Stdout throughput: a container writes N bytes; the shim copies them to ``ctr run --rm``.

Path: ``dd if=/dev/zero bs=1M count=N`` -> stdout fifo -> shim copier -> ctr's fifo -> ctr
-> a pipe that this process reads and counts.  Two rates per run:

* ``stream``: bytes / (first byte .. EOF) — the copy path alone;
* ``wall``: bytes / (ctr start .. ctr exit) — includes container start/teardown.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import subprocess
import tempfile
import threading
import time

from integration.harness import Containerd

from .tasks import SHIMS, alternate, log, runtime, task_id

F_SETPIPE_SZ = 1031
READ_SIZE = 1 << 20
DD_BS = 1 << 20  # the writer: dd with 1 MiB writes (busybox head writes 4 KiB at a time)
MiB = float(1 << 20)


def one(c: Containerd, ref: str, shim: str, cid: str, nbytes: int, timeout: float = 300) -> dict:
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = c.ctr_popen("run", "--rm", *runtime(c, shim), ref, cid,
                        "dd", "if=/dev/zero", f"bs={DD_BS}", f"count={nbytes // DD_BS}", stdout=subprocess.PIPE, stderr=err)
        watchdog = threading.Timer(timeout, p.kill)
        watchdog.start()
        try:
            fd = p.stdout.fileno()
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, READ_SIZE)
            except OSError:
                pass
            buf = bytearray(READ_SIZE)
            view = memoryview(buf)
            count = 0
            first = None
            while True:
                k = os.readv(fd, [view])
                if k == 0:
                    break
                if first is None:
                    first = time.perf_counter()
                count += k
            last = time.perf_counter()
            rc = p.wait()
            t_exit = time.perf_counter()
        finally:
            watchdog.cancel()
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
        if rc != 0 or count != nbytes:
            err.seek(0)
            raise RuntimeError(f"{shim}: ctr exit {rc}, {count}/{nbytes} bytes: "
                               f"{err.read().decode(errors='replace')[-500:]}")
    stream_s = max(last - (first or last), 1e-9)
    wall_s = t_exit - t0
    return {"bytes": count, "stream_s": stream_s, "wall_s": wall_s,
            "first_byte_s": (first or last) - t0,
            "stream_mib_s": count / MiB / stream_s, "wall_mib_s": count / MiB / wall_s}


def run(c: Containerd, ref: str, mib: int, runs: int) -> dict:
    nbytes = mib << 20  # a whole number of DD_BS blocks
    log(f"throughput: {mib} MiB to stdout, {runs} run(s) per shim")
    samples: dict[str, list[dict]] = {s: [] for s in SHIMS}
    for i in range(runs):
        for shim in alternate(i):
            r = one(c, ref, shim, task_id("tp", shim, i), nbytes)
            samples[shim].append(r)
            log(f"throughput:   {shim}: {r['stream_mib_s']:.0f} MiB/s stream, {r['wall_mib_s']:.0f} MiB/s wall")
    out: dict = {"mib": mib, "runs": runs}
    for shim in SHIMS:
        out[shim] = {
            "median_stream_mib_s": statistics.median(r["stream_mib_s"] for r in samples[shim]),
            "median_wall_mib_s": statistics.median(r["wall_mib_s"] for r in samples[shim]),
            "runs": samples[shim],
        }
    return out
