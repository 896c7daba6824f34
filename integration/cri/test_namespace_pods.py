"""Pods through the CRI plugin with ShimGroup = "namespace" (handler ``runc-py-shared``,
deploy/runc-py-namespace.toml): one shim serves every pod and container of k8s.io."""

from __future__ import annotations

from integration.cri.harness import PY_SHARED_HANDLER
from integration.cri.test_pods import _teardown_and_check
from integration.shim_driver import listening_pids

PODS = 3


def serving(cri, task_id: str) -> set[int]:
    address = (cri.bundle_dir / task_id / "address").read_text().strip()
    return listening_pids(address.removeprefix("unix://"))


def test_pods_share_one_namespace_shim(cri, kubelet, pb):
    pods = [kubelet.run_pod(f"shared{i}", PY_SHARED_HANDLER) for i in range(PODS)]
    containers = [kubelet.start_container(pod, "c", "sleep 3600") for pod in pods]
    for pod in pods:
        assert cri.client.sandbox_status(pod.id).status.state == pb.SANDBOX_READY
    for cid in containers:
        assert cri.client.container_status(cid).status.state == pb.CONTAINER_RUNNING
    shims = set().union(*(serving(cri, task) for task in [p.id for p in pods] + containers))
    assert len(shims) == 1, shims
    shim = shims.pop()

    for pod, cid in zip(pods, containers, strict=True):  # each pod's container is its own: exec, hostname
        r = cri.client.exec_sync(cid, ["cat", "/etc/hostname"])
        assert (r.stdout.decode().strip(), r.exit_code) == (pod.name, 0)

    # removing one pod leaves the shim serving the others
    kubelet.remove_pod(pods[0])
    assert serving(cri, containers[1]) == {shim}
    r = cri.client.exec_sync(containers[1], ["echo", "still"])
    assert (r.stdout, r.exit_code) == (b"still\n", 0)
    _teardown_and_check(kubelet, pods[1:], [shim])
