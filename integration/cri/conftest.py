"""Fixtures for the CRI suite: one private containerd with its CRI plugin per session.

  cri_api  (session)  the runtime.v1 modules, generated from proto/api.proto into a temp dir
  cri      (session)  a started ``CriContainerd`` (images imported, CNI network configured);
                      ``cri.client`` is a ``CriClient`` on its socket
  pb       (session)  the generated api_pb2 module (messages, enums)
  kubelet  (function) a ``Kubelet``: runs pods/containers; removes what a test left behind

Skipped, with the reason, when not root or when containerd/runc/ip(8)/the CNI plugins
(bridge, host-local, loopback in /usr/lib/cni: ``apt-get install containernetworking-plugins``)
are missing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

from integration.cri.harness import (
    BUSYBOX_REF,
    PAUSE_REF,
    CriClient,
    CriContainerd,
    Kubelet,
    links_on_bridge,
    load_cri_api,
    skip_reason,
)
from integration.harness import wait_for

_SKIP = skip_reason()
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if _SKIP is None:
        return
    marker = pytest.mark.skip(reason=_SKIP)
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def cri_api():
    out = tempfile.mkdtemp(prefix="shimtest-cri-api-")
    try:
        yield load_cri_api(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def pb(cri_api):
    return cri_api.pb


@pytest.fixture(scope="session")
def cri(cri_api, crun_cgroups):
    if _SKIP is not None:
        pytest.skip(_SKIP)
    c = CriContainerd(log_level=os.environ.get("SHIMTEST_CONTAINERD_LOG_LEVEL", "debug"))
    t0 = time.monotonic()
    c.start()
    client = None
    try:
        c.import_images()
        client = CriClient(cri_api, c.address)
        c.client = client
        pb_ = cri_api.pb
        for ref in (BUSYBOX_REF, PAUSE_REF):  # CRI learns about images from containerd's events
            wait_for(lambda: client.img("ImageStatus", image=pb_.ImageSpec(image=ref)).image.id,
                     timeout=20, interval=0.1, message=f"CRI to see image {ref}")

        def network_ready():
            conds = {x.type: x for x in client.rt("Status").status.conditions}
            return conds.get("NetworkReady") and conds["NetworkReady"].status
        wait_for(network_ready, timeout=20, interval=0.1, message="CRI NetworkReady (CNI config loaded)")
        sys.stderr.write(f"\n[cri] containerd with CRI ready in {time.monotonic() - t0:.1f}s "
                         f"(bridge {c.bridge}, {c.subnet}, dir {c.dir})\n")
        yield c
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
        log_tail = c.log_tail(60) if c.dir else ""
        report = c.stop()
        if left or report or c.network_report:
            sys.stderr.write(f"\n[cri harness] cleaned up after the session: pods {left}; {report}; "
                             f"{c.network_report}\n")
            if os.environ.get("SHIMTEST_SHOW_LOG"):
                sys.stderr.write(log_tail + "\n")


@pytest.fixture
def kubelet(cri):
    k = Kubelet(cri, cri.client)
    veths = set(links_on_bridge(cri.bridge))
    yield k
    left = k.cleanup()
    if left:
        sys.stderr.write(f"\n[cri] test left pods {left}; removed\n")
    try:
        wait_for(lambda: set(links_on_bridge(cri.bridge)) <= veths, timeout=5, interval=0.1)
    except TimeoutError:
        sys.stderr.write(f"\n[cri] VETH LEAK {set(links_on_bridge(cri.bridge)) - veths} "
                         f"pods {[(p.name, p.id[:12], p.veth) for p in k.pods]}\n")
