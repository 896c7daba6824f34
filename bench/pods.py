"""Pods through CRI: N pods per runtime handler, ``runc-py`` (this shim) vs ``runc`` (Go shim).

A private containerd with its CRI plugin and a CNI bridge network of its own
(``integration.cri.harness.CriContainerd``, set up as the CRI test suite's
session fixture does), driven like kubelet (``Kubelet``/``CriClient``).  Each pod
is a sandbox (pause) plus one busybox ``sleep`` container.

* one warm-up pod per handler (not counted; unpacks the images' snapshots, starts
  our template), removed again;
* N pods per handler, started one after another, handlers alternating (go, python,
  then python, go, ...); the start latency of a pod is the wall time of its
  RunPodSandbox + CreateContainer + StartContainer calls;
* with all 2N pods RUNNING, settle, sum Rss/Pss/USS over each shim family of this
  containerd (ours includes the template), and count the shims of each pod;
* remove every pod (StopPodSandbox + RemovePodSandbox), check that no shim and
  nothing else of the pods is left, stop containerd (the harness removes the
  bridge, veths, netns, CNI cache and cgroups) and check the bridge is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator

from integration.cri.harness import (
    BUSYBOX_REF,
    GO_HANDLER,
    PAUSE_REF,
    PY_HANDLER,
    CriClient,
    CriContainerd,
    Kubelet,
    link_exists,
    links_on_bridge,
    load_cri_api,
    skip_reason,
)
from integration.harness import wait_for

from . import procs
from .tasks import alternate, log, parallel, summary

HANDLERS = {"go": GO_HANDLER, "python": PY_HANDLER}
#: the CRI containerd's runtime handlers (integration/cri/harness.py) are the Go shim and this
#: shim in container mode; namespace mode and the Rust shim have none there
SHIMS = tuple(HANDLERS)
SLEEP_CMD = ["sleep", "86400"]
START_CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer")


class TimedClient(CriClient):
    """A ``CriClient`` that remembers the wall time of the last call of each RuntimeService method."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.last: dict[str, float] = {}

    def rt(self, method: str, *a, **kw):
        t0 = time.perf_counter()
        try:
            return super().rt(method, *a, **kw)
        finally:
            self.last[method] = time.perf_counter() - t0


@contextlib.contextmanager
def cri_containerd() -> Iterator[tuple[CriContainerd, TimedClient]]:
    """A started CriContainerd (images imported, CNI ready) and a client; everything removed after.

    The same steps as the CRI suite's ``cri`` fixture (integration/cri/conftest.py).
    """
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(f"pods: cannot run CRI here: {reason}")
    api_dir = tempfile.mkdtemp(prefix="shimbench-cri-api-")
    c = CriContainerd(log_level="warn")
    client: TimedClient | None = None
    try:
        api = load_cri_api(api_dir)
        c.start()
        c.import_images()
        client = TimedClient(api, c.address)
        c.client = client
        pb = api.pb
        for ref in (BUSYBOX_REF, PAUSE_REF):  # CRI learns about images from containerd's events
            wait_for(lambda: client.img("ImageStatus", image=pb.ImageSpec(image=ref)).image.id,
                     timeout=20, interval=0.1, message=f"CRI to see image {ref}")

        def network_ready():
            conds = {x.type: x for x in client.rt("Status").status.conditions}
            return conds.get("NetworkReady") and conds["NetworkReady"].status
        wait_for(network_ready, timeout=20, interval=0.1, message="CRI NetworkReady (CNI config loaded)")
        yield c, client
    finally:
        left = []
        if client is not None and c.proc is not None and c.proc.poll() is None:
            try:
                for sb in client.rt("ListPodSandbox").items:
                    left.append(sb.id[:12])
                    client.rt("StopPodSandbox", pod_sandbox_id=sb.id)
                    client.rt("RemovePodSandbox", pod_sandbox_id=sb.id)
            except Exception as e:  # noqa: BLE001 - containerd unusable: the harness kills what is left
                left.append(f"(CRI cleanup failed: {e!r})")
        if client is not None:
            client.close()
        address = c.address if c.dir is not None else None
        bridge = c.bridge
        report = c.stop()
        if address is not None:
            killed = procs.stop_templates(address)
            if killed:
                log(f"pods: stopped python shim template(s) {killed}")
        if left or report or c.network_report:
            log(f"pods: cleaned up at CRI containerd stop: pods {left}; {report}; {c.network_report}")
        if link_exists(bridge):
            log(f"pods: CNI bridge {bridge} still present after teardown")
        shutil.rmtree(api_dir, ignore_errors=True)


def _cri_shims(c: CriContainerd) -> dict[str, list[int]]:
    return {f: p for f, p in procs.family_pids(c.address, templates=False).items() if p}


def _bring_up(kubelet: Kubelet, client: TimedClient, shim: str, name: str):
    """One pod (sandbox + a ``sleep`` container); returns (pod, {call: seconds})."""
    t0 = time.perf_counter()
    pod = kubelet.run_pod(name, HANDLERS[shim])
    calls = {"RunPodSandbox": client.last["RunPodSandbox"]}
    kubelet.start_container(pod, "app", command=SLEEP_CMD)
    calls["CreateContainer"] = client.last["CreateContainer"]
    calls["StartContainer"] = client.last["StartContainer"]
    calls["bring_up_wall"] = time.perf_counter() - t0  # incl. the harness's PodSandboxStatus
    return pod, calls


def _wait_template(c: CriContainerd, timeout: float = 15.0) -> bool:
    """Our template of this containerd is up and listening (the warm-up pod started it)."""
    def ready() -> bool:
        for pid, kind in procs.family_procs(c.address)["python"].items():
            sock = procs.template_socket(procs.cmdline(pid) or [])
            if kind == "template" and sock and os.path.exists(sock):
                return True
        return False
    try:
        wait_for(ready, timeout=timeout, interval=0.1, message="python shim template")
        return True
    except TimeoutError:
        return False


def run(n: int, settle: float) -> dict:
    out: dict = {"pods_per_runtime": n, "handlers": dict(HANDLERS), "container_cmd": SLEEP_CMD}
    with cri_containerd() as (c, client):
        pb = client.pb
        out["bridge"] = c.bridge
        out["subnet"] = str(c.subnet)
        log(f"pods: CRI containerd at {c.address} (bridge {c.bridge}, {c.subnet})")
        kubelet = Kubelet(c, client)
        pods = []
        try:
            for shim in SHIMS:  # warm-up, not counted
                pod, _ = _bring_up(kubelet, client, shim, f"warm-{shim}")
                kubelet.remove_pod(pod)
            wait_for(lambda: not _cri_shims(c), timeout=30, interval=0.1,
                     message=lambda: f"warm-up shims to exit (left: {_cri_shims(c)})")
            out["template_ready"] = _wait_template(c)

            log(f"pods: starting {n} pods per runtime, one after another, interleaved")
            times: dict[str, list[dict]] = {s: [] for s in SHIMS}
            by_shim: dict[str, list] = {s: [] for s in SHIMS}
            for i in range(n):
                for shim in alternate(i, SHIMS):
                    pod, calls = _bring_up(kubelet, client, shim, f"bench-{shim}-{i}")
                    pods.append(pod)
                    by_shim[shim].append(pod)
                    times[shim].append(calls)

            for pod in pods:  # every pod READY with an address on the bridge, its container RUNNING
                st = client.sandbox_status(pod.id).status
                if st.state != pb.SANDBOX_READY or not st.network.ip:
                    raise RuntimeError(f"pod {pod.name}: state {st.state}, ip {st.network.ip!r}")
                cst = client.container_status(pod.containers[0]).status
                if cst.state != pb.CONTAINER_RUNNING:
                    raise RuntimeError(f"pod {pod.name}: container state {cst.state}")
            veths = len(links_on_bridge(c.bridge))
            if veths != len(pods):
                raise RuntimeError(f"{veths} veths on {c.bridge} for {len(pods)} pods")
            time.sleep(settle)

            fams = procs.family_procs(c.address)
            for shim in SHIMS:
                m = procs.measure(fams[shim])
                per_pod = [len(c.shim_pids(p.id)) for p in by_shim[shim]]
                per_container = [len(c.shim_pids(p.containers[0])) for p in by_shim[shim]]
                starts = [sum(t[k] for k in START_CALLS) for t in times[shim]]
                out[shim] = {
                    "memory": m,
                    "start": summary(starts),
                    "calls": {k: summary([t[k] for t in times[shim]]) for k in (*START_CALLS, "bring_up_wall")},
                    "shims_per_pod": per_pod,
                    "mean_shims_per_pod": statistics.fmean(per_pod),
                    "shims_named_after_containers": sum(per_container),
                    "shim_processes": m["count"] - m["templates"],
                }
                if m["count"] - m["templates"] != n:
                    raise RuntimeError(f"{shim}: {m['count'] - m['templates']} shim processes for {n} pods "
                                       f"(per pod: {per_pod})")
            out["veths"] = veths
            log("pods:   " + ", ".join(
                f"{s} Pss {out[s]['memory']['sum']['pss'] / 2**20:.1f} MiB ({out[s]['memory']['count']} procs), "
                f"start median {out[s]['start']['median_s'] * 1e3:.0f} ms" for s in SHIMS))
        finally:
            t0 = time.perf_counter()
            parallel(kubelet.remove_pod, [p for p in kubelet.pods if not p.removed], 4)
            wait_for(lambda: not _cri_shims(c), timeout=30, interval=0.1,
                     message=lambda: f"pod shims to exit (left: {_cri_shims(c)})")
            out["teardown_s"] = time.perf_counter() - t0
            try:
                wait_for(lambda: not kubelet.leftovers(kubelet.pods), timeout=5, interval=0.1)
            except TimeoutError:
                pass
            left = kubelet.leftovers(kubelet.pods)
            if left:
                raise RuntimeError(f"pods: left behind after removal: {left}")
            log(f"pods: {len(kubelet.pods)} pods removed in {out['teardown_s']:.1f} s, no shim left")
    out["bridge_removed"] = not link_exists(out["bridge"])
    if not out["bridge_removed"]:
        raise RuntimeError(f"pods: CNI bridge {out['bridge']} still present after teardown")
    return out
