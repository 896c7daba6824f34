"""The Kubernetes path: pods run through containerd 1.6's CRI plugin, as kubelet drives it.

The tests play kubelet with a gRPC CRI client (runtime.v1) against a private containerd whose
CRI plugin has two runtime handlers: ``runc-py`` (this shim, runtime_type
io.containerd.runc.v2-py) and ``runc`` (containerd's Go shim), the reference that the
parametrized tests hold the same expectations against. Pods get a private CNI bridge network.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import ipaddress
import os
import signal
import time

import grpc
import pytest

from integration.cri.harness import (
    BUSYBOX_REF,
    GO_HANDLER,
    GO_RUNTIME,
    PAUSE_REF,
    PY_HANDLER,
    PY_RUNTIME,
    cgroup_dir,
    icmp_echo,
    links_on_bridge,
    parse_cri_log,
    ppid_of,
    route_dev,
    shim_stats,
)
from integration.harness import (
    GO_SHIM_BINARY,
    PY_SHIM_BINARY,
    SHIM_SOCKET_DIR,
    _flag_value,
    orphan_sockets,
    pid_alive,
    read_cmdline,
    wait_for,
)

MiB = 1024 * 1024
HANDLERS = [PY_HANDLER, GO_HANDLER]
SHIM_BINARY = {PY_HANDLER: PY_SHIM_BINARY, GO_HANDLER: GO_SHIM_BINARY}
RUNTIME_TYPE = {PY_HANDLER: PY_RUNTIME, GO_HANDLER: GO_RUNTIME}


def _rfc3339(text: str) -> dt.datetime:
    """RFC3339Nano as CRI writes it (Go trims trailing zeros; Python wants <= 6 digits)."""
    text = text.replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:
        frac, tz = rest[:-6], rest[-6:]
        text = f"{head}.{frac[:6].ljust(6, '0')}{tz}"
    return dt.datetime.fromisoformat(text)


def _teardown_and_check(kubelet, pods, shims=()):
    """Stop + remove pods as kubelet does; their shims exit; nothing of them stays on the host."""
    for pod in pods:
        kubelet.remove_pod(pod)
    for pid in shims:
        wait_for(lambda: not pid_alive(pid), timeout=15, message=f"shim {pid} to exit after the pod went")
    try:
        wait_for(lambda: not kubelet.leftovers(pods), timeout=5, interval=0.1)
    except TimeoutError:
        pass
    left = kubelet.leftovers(pods)
    assert not left, f"left behind: {left}"
    ids = {p.id for p in pods}
    assert not ids & {sb.id for sb in kubelet.client.rt("ListPodSandbox").items}


# --------------------------------------------------------------------------
# runtime and images
# --------------------------------------------------------------------------

def test_version_status_and_images(cri, pb):
    v = cri.client.rt("Version", version="v1")
    assert (v.runtime_name, v.runtime_api_version) == ("containerd", "v1")
    assert v.runtime_version.startswith("1.6")
    conditions = {c.type: c.status for c in cri.client.rt("Status").status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}

    tags = {t for image in cri.client.img("ListImages").images for t in image.repo_tags}
    assert {BUSYBOX_REF, PAUSE_REF} <= tags
    status = cri.client.img("ImageStatus", image=pb.ImageSpec(image=BUSYBOX_REF)).image
    assert status.id.startswith("sha256:") and BUSYBOX_REF in status.repo_tags and status.size > 0
    missing = cri.client.img("ImageStatus", image=pb.ImageSpec(image="docker.io/shimtest/absent:1"))
    assert not missing.HasField("image")


# --------------------------------------------------------------------------
# one pod, one shim
# --------------------------------------------------------------------------

@pytest.mark.parametrize("handler", HANDLERS)
def test_pod_with_two_containers_has_one_shim(cri, kubelet, pb, handler):
    shims_before = set(cri.shim_pids())
    pod = kubelet.run_pod("two", handler)
    status = cri.client.sandbox_status(pod.id).status
    assert status.state == pb.SANDBOX_READY
    assert status.runtime_handler == handler
    assert ipaddress.ip_address(status.network.ip) in cri.subnet
    info = cri.client.sandbox_info(pod.id)
    assert info["runtimeType"] == RUNTIME_TYPE[handler]
    if handler == PY_HANDLER:
        # CRI 1.6 sends a non-runc runtime type's options table as runtimeoptions.v1.Options;
        # the shim takes BinaryName from the TOML file it names
        assert info["runtimeOptions"] == {"config_path": str(cri.runc_py_toml)}
        assert (cri.bundle_dir / pod.id / "runtime").read_text().strip() == cri.runc_binary
    assert pod.netns and pod.netns.startswith(str(cri.netns_dir))

    a = kubelet.start_container(pod, "a", "sleep 3600")
    b = kubelet.start_container(pod, "b", "sleep 3600")
    for cid in (a, b):
        assert cri.client.container_status(cid).status.state == pb.CONTAINER_RUNNING
    listed = cri.client.rt("ListContainers", filter=pb.ContainerFilter(pod_sandbox_id=pod.id)).containers
    assert {c.id for c in listed} == {a, b}

    # one shim for the pod: named after the sandbox, none for the containers, no other new one
    shim = kubelet.shim_of(pod)
    assert cri.shim_pids(a) == [] and cri.shim_pids(b) == []
    assert set(cri.shim_pids()) - shims_before == {shim}
    argv = read_cmdline(shim)
    # the Go shim and a template-forked Python shim show the binary's name; a spawned Python
    # shim runs as "python -I -c 'from shim.daemon.main import ...' -namespace ..."
    assert (os.path.basename(argv[0]) == SHIM_BINARY[handler]
            or (handler == PY_HANDLER and "shim.daemon" in " ".join(argv))), argv
    assert (_flag_value(argv, "namespace"), _flag_value(argv, "id")) == ("k8s.io", pod.id)
    # ... and it is the parent (subreaper) of the pause process and of both containers
    for pid in (kubelet.task_pid(pod.id, sandbox=True), kubelet.task_pid(a), kubelet.task_pid(b)):
        assert ppid_of(pid) == shim, f"pid {pid} ({read_cmdline(pid)}) is not the shim's child"

    kubelet.stop_pod(pod)
    assert cri.client.sandbox_status(pod.id).status.state == pb.SANDBOX_NOTREADY
    for cid in (a, b):
        st = cri.client.container_status(cid).status
        assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 137)
    _teardown_and_check(kubelet, [pod], [shim])


@pytest.mark.parametrize("handler", HANDLERS)
def test_host_network_pod(cri, kubelet, pb, handler):
    veths = set(links_on_bridge(cri.bridge))
    pod = kubelet.run_pod("hostnet", handler, host_network=True)
    status = cri.client.sandbox_status(pod.id).status
    assert status.state == pb.SANDBOX_READY
    assert status.network.ip == ""
    assert status.linux.namespaces.options.network == pb.NODE
    cid = kubelet.start_container(pod, "c", "sleep 3600")
    r = cri.client.exec_sync(cid, ["readlink", "/proc/self/ns/net"])
    assert r.exit_code == 0
    assert r.stdout.decode().strip() == os.readlink("/proc/self/ns/net")
    assert set(links_on_bridge(cri.bridge)) == veths  # no CNI for a host-network pod
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


# --------------------------------------------------------------------------
# exit codes, reasons and logs
# --------------------------------------------------------------------------

@pytest.mark.parametrize("handler", HANDLERS)
def test_exit_codes_reasons_and_cri_logs(cri, kubelet, pb, handler):
    t0 = dt.datetime.now(dt.UTC)
    pod = kubelet.run_pod("logs", handler)
    ok = kubelet.start_container(pod, "ok", 'echo hello; echo "to stderr" >&2; echo "two words"; printf partial')
    bad = kubelet.start_container(pod, "bad", "echo bye; exit 3")
    st_ok = cri.client.wait_container_state(ok, pb.CONTAINER_EXITED)
    st_bad = cri.client.wait_container_state(bad, pb.CONTAINER_EXITED)
    assert (st_ok.exit_code, st_ok.reason) == (0, "Completed")
    assert (st_bad.exit_code, st_bad.reason) == (3, "Error")
    for st in (st_ok, st_bad):
        # started_at is CRI's clock after Start returned, finished_at the shim's exit time: a
        # container this short may exit before Start returns, so only created_at bounds them
        assert st.created_at <= st.started_at and st.created_at <= st.finished_at
    assert st_ok.log_path == str(kubelet.log_path(pod, "ok"))

    lines = parse_cri_log(kubelet.log_path(pod, "ok").read_text())
    by_stream = {s: [(tag, text) for _, st_, tag, text in lines if st_ == s] for s in ("stdout", "stderr")}
    # a line without its newline at EOF is written as a partial (P) line
    assert by_stream == {"stdout": [("F", "hello"), ("F", "two words"), ("P", "partial")],
                         "stderr": [("F", "to stderr")]}
    t1 = dt.datetime.now(dt.UTC)
    for stamp, *_ in lines:
        assert t0 - dt.timedelta(seconds=1) <= _rfc3339(stamp) <= t1 + dt.timedelta(seconds=1)
    assert [(s, t, c) for _, s, t, c in parse_cri_log(kubelet.log_path(pod, "bad").read_text())] == \
        [("stdout", "F", "bye")]
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


@pytest.mark.parametrize("handler", HANDLERS)
def test_oom_killed_reason(cri, kubelet, pb, handler):
    pod = kubelet.run_pod("oom", handler)
    cid = kubelet.start_container(pod, "hog", command=["tail", "/dev/zero"], memory=32 * MiB)
    st = cri.client.wait_container_state(cid, pb.CONTAINER_EXITED, timeout=60)
    assert (st.exit_code, st.reason) == (137, "OOMKilled")
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


# --------------------------------------------------------------------------
# ExecSync
# --------------------------------------------------------------------------

@pytest.mark.parametrize("handler", HANDLERS)
def test_exec_sync(cri, kubelet, pb, handler):
    pod = kubelet.run_pod("exec", handler)
    cid = kubelet.start_container(pod, "c", "sleep 3600")
    client = cri.client

    r = client.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
    r = client.exec_sync(cid, ["cat", "/etc/hostname"])
    assert (r.stdout, r.exit_code) == (b"exec\n", 0)
    r = client.exec_sync(cid, ["seq", "1", "50000"])
    assert r.exit_code == 0 and r.stdout.decode().split() == [str(i) for i in range(1, 50001)]

    # CRI's timeout: it kills the exec (SIGKILL) and answers DEADLINE_EXCEEDED
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        client.exec_sync(cid, ["sleep", "30"], timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "timeout 1s exceeded" in e.value.details()
    assert time.monotonic() - t < 10
    ps = client.exec_sync(cid, ["ps", "-o", "args"]).stdout.decode().splitlines()
    assert not any(line.strip() == "sleep 30" for line in ps), ps

    assert client.container_status(cid).status.state == pb.CONTAINER_RUNNING
    shim = kubelet.shim_of(pod)
    _teardown_and_check(kubelet, [pod], [shim])


def _exec_missing_binary_then_remove_pod(cri, kubelet, pb, handler):
    pod = kubelet.run_pod("exec-fail", handler)
    cid = kubelet.start_container(pod, "c", "sleep 3600")
    shim = kubelet.shim_of(pod)
    with pytest.raises(grpc.RpcError) as e:
        cri.client.exec_sync(cid, ["/nonexistent"], timeout=5)
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    assert "no such file or directory" in e.value.details().lower()
    assert cri.client.exec_sync(cid, ["true"]).exit_code == 0  # the container is unharmed
    _teardown_and_check(kubelet, [pod], [shim])


def test_failed_exec_then_pod_removal_go_shim(cri, kubelet, pb):
    _exec_missing_binary_then_remove_pod(cri, kubelet, pb, GO_HANDLER)


def test_failed_exec_then_pod_removal_py_shim(cri, kubelet, pb):
    try:
        _exec_missing_binary_then_remove_pod(cri, kubelet, pb, PY_HANDLER)
    finally:
        # the leaked shim holds nothing but its socket: end it (by pid), remove its socket
        for pod in kubelet.pods:
            for pid in cri.shim_pids(pod.id):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not pid_alive(pid), timeout=5, message=f"leaked shim {pid} to die")
            for path in orphan_sockets([str(SHIM_SOCKET_DIR / cri.shim_socket_name(pod.id))]):
                os.unlink(path)


# --------------------------------------------------------------------------
# stats and resources
# --------------------------------------------------------------------------

def test_container_stats_and_list(cri, kubelet, pb):
    pod = kubelet.run_pod("stats")
    busy = kubelet.start_container(pod, "busy", "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; sleep 3600",
                                   memory=64 * MiB)
    idle = kubelet.start_container(pod, "idle", "sleep 3600")

    def cpu(cid):
        return cri.client.rt("ContainerStats", container_id=cid).stats.cpu.usage_core_nano_seconds.value

    def counted(cid):
        stats = cri.client.rt("ContainerStats", container_id=cid).stats
        return stats.cpu.usage_core_nano_seconds.value > 0 and stats.memory.working_set_bytes.value > 0

    wait_for(lambda: cpu(busy) > 20_000_000, timeout=20, message="busy container's CPU > 20ms")
    wait_for(lambda: counted(idle), timeout=20, message="the idle container's CPU and memory to be counted")
    stats = cri.client.rt("ContainerStats", container_id=busy).stats
    assert stats.attributes.id == busy and stats.attributes.metadata.name == "busy"
    assert stats.cpu.timestamp > 0
    mem = stats.memory
    assert mem.working_set_bytes.value > 0 and mem.usage_bytes.value >= mem.working_set_bytes.value
    # limit 64 MiB: available = limit - working set
    assert mem.available_bytes.value + mem.working_set_bytes.value == 64 * MiB
    assert mem.page_faults.value > 0

    listed = cri.client.rt("ListContainerStats",
                           filter=pb.ContainerStatsFilter(pod_sandbox_id=pod.id)).stats
    assert {s.attributes.id for s in listed} == {busy, idle}
    for s in listed:
        assert s.cpu.usage_core_nano_seconds.value > 0 and s.memory.working_set_bytes.value > 0
    one = cri.client.rt("ListContainerStats", filter=pb.ContainerStatsFilter(id=idle)).stats
    assert [s.attributes.id for s in one] == [idle]
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


def test_update_container_resources(cri, kubelet, pb):
    pod = kubelet.run_pod("update")
    cid = kubelet.start_container(pod, "c", "sleep 3600", memory=64 * MiB)
    mem = cgroup_dir(cri, pod, cid, "memory")
    cpu = cgroup_dir(cri, pod, cid, "cpu")
    assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == -1

    cri.client.rt("UpdateContainerResources", container_id=cid, linux=pb.LinuxContainerResources(
        memory_limit_in_bytes=96 * MiB, cpu_period=100_000, cpu_quota=50_000, cpu_shares=512))
    assert int((mem / "memory.limit_in_bytes").read_text()) == 96 * MiB
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50_000
    assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000
    assert int((cpu / "cpu.shares").read_text()) == 512
    res = cri.client.container_status(cid).status.resources.linux
    assert (res.memory_limit_in_bytes, res.cpu_quota, res.cpu_shares) == (96 * MiB, 50_000, 512)
    stats = cri.client.rt("ContainerStats", container_id=cid).stats.memory
    assert stats.available_bytes.value + stats.working_set_bytes.value == 96 * MiB
    # the container keeps running under its new limits
    assert cri.client.exec_sync(cid, ["true"]).exit_code == 0
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


# --------------------------------------------------------------------------
# stopping, restarting
# --------------------------------------------------------------------------

@pytest.mark.parametrize("handler", HANDLERS)
def test_stop_container_grace_period(cri, kubelet, pb, handler):
    pod = kubelet.run_pod("stop", handler)
    polite = kubelet.start_container(
        pod, "polite", 'trap "echo got TERM; exit 0" TERM; echo ready; while :; do sleep 1 & wait $!; done')
    stubborn = kubelet.start_container(pod, "stubborn", 'trap "" TERM; echo ready; while :; do sleep 1; done')
    for name in ("polite", "stubborn"):  # the traps are set once "ready" is out
        wait_for(lambda: "ready" in kubelet.log_path(pod, name).read_text(), timeout=10,
                 message=f"{name} ready")

    t = time.monotonic()
    cri.client.rt("StopContainer", container_id=polite, timeout=10)
    took = time.monotonic() - t
    st = cri.client.container_status(polite).status
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 0, "Completed")
    assert took < 5, f"a container that exits on TERM took {took:.1f}s to stop"
    assert [c for *_, c in parse_cri_log(kubelet.log_path(pod, "polite").read_text())] == ["ready", "got TERM"]

    t = time.monotonic()
    cri.client.rt("StopContainer", container_id=stubborn, timeout=2)
    took = time.monotonic() - t
    st = cri.client.container_status(stubborn).status
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 137, "Error")
    assert 2 <= took < 8, f"stop with a 2s grace period took {took:.1f}s"

    # stopping an exited container again is a no-op
    cri.client.rt("StopContainer", container_id=stubborn, timeout=2)
    cri.client.rt("RemoveContainer", container_id=polite)
    with pytest.raises(grpc.RpcError) as e:
        cri.client.container_status(polite)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    pod.containers.remove(polite)
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


def test_container_restart_in_pod_keeps_the_shim(cri, kubelet, pb):
    pod = kubelet.run_pod("restart")
    first = kubelet.start_container(pod, "app", "echo attempt-0; exit 1")
    st = cri.client.wait_container_state(first, pb.CONTAINER_EXITED)
    assert (st.exit_code, st.reason) == (1, "Error")
    shim = kubelet.shim_of(pod)  # the pod's shim outlives the container

    # kubelet's restart: a new container (attempt 1) in the same sandbox, then the old one goes
    second = kubelet.start_container(pod, "app", "echo attempt-1; sleep 3600", attempt=1)
    assert cri.client.container_status(second).status.state == pb.CONTAINER_RUNNING
    assert cri.client.container_status(second).status.metadata.attempt == 1
    assert cri.shim_pids(pod.id) == [shim] and cri.shim_pids(second) == []
    assert ppid_of(kubelet.task_pid(second)) == shim
    cri.client.rt("RemoveContainer", container_id=first)
    listed = cri.client.rt("ListContainers", filter=pb.ContainerFilter(pod_sandbox_id=pod.id)).containers
    assert [c.id for c in listed] == [second]
    wait_for(lambda: "attempt-1" in kubelet.log_path(pod, "app", 1).read_text(), timeout=10,
             message="attempt 1's log")
    assert "attempt-0" in kubelet.log_path(pod, "app", 0).read_text()

    # and once more, with the running one stopped first
    cri.client.rt("StopContainer", container_id=second, timeout=1)
    third = kubelet.start_container(pod, "app", "sleep 3600", attempt=2)
    assert cri.shim_pids(pod.id) == [shim]
    assert ppid_of(kubelet.task_pid(third)) == shim
    pod.containers.remove(first)
    _teardown_and_check(kubelet, [pod], [shim])


# --------------------------------------------------------------------------
# network counters from the shim
# --------------------------------------------------------------------------

def _iface(metrics, name):
    found = [n for n in metrics.network if n.name == name]
    assert found, f"no {name} in the shim's network stats: {[n.name for n in metrics.network]}"
    return found[0]


def test_pod_network_counters_from_the_shim(cri, kubelet, pb):
    pod = kubelet.run_pod("net")
    cid = kubelet.start_container(pod, "c", "sleep 3600")
    ip = cri.client.sandbox_status(pod.id).status.network.ip
    assert ipaddress.ip_address(ip) in cri.subnet
    # traffic stays on our bridge: the host must route the pod's address through it
    assert route_dev(ip) == cri.bridge, f"{ip} is not routed through {cri.bridge}"

    before = _iface(shim_stats(cri, pod.id), "eth0")
    assert {n.name for n in shim_stats(cri, pod.id).network} >= {"lo", "eth0"}
    replies = icmp_echo(ip, count=5, timeout=1.0)
    after = _iface(shim_stats(cri, pod.id), "eth0")
    assert replies == 5
    assert after.rx_packets >= before.rx_packets + 5
    assert after.rx_bytes >= before.rx_bytes + 5 * (14 + 20 + 8 + 56)
    assert after.tx_packets >= before.tx_packets + 5
    # a container of the pod shares the netns: its task reports the same interface
    same = _iface(shim_stats(cri, pod.id, cid), "eth0")
    assert same.rx_packets >= after.rx_packets
    # CRI's own PodSandboxStats reads the netns itself; it agrees
    net = cri.client.rt("PodSandboxStats", pod_sandbox_id=pod.id).stats.linux.network
    assert net.default_interface.name == "eth0"
    assert net.default_interface.rx_bytes.value >= after.rx_bytes
    _teardown_and_check(kubelet, [pod], [kubelet.shim_of(pod)])


# --------------------------------------------------------------------------
# many pods
# --------------------------------------------------------------------------

def test_ten_pods_at_once(cri, kubelet, pb):
    n = 10
    veths_before = set(links_on_bridge(cri.bridge))

    def bring_up(i):
        pod = kubelet.run_pod(f"many-{i}")
        kubelet.start_container(pod, "app", "sleep 3600")
        return pod

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        pods = list(ex.map(bring_up, range(n)))
    up = time.monotonic() - t

    ips = set()
    for pod in pods:
        st = cri.client.sandbox_status(pod.id).status
        assert st.state == pb.SANDBOX_READY
        assert ipaddress.ip_address(st.network.ip) in cri.subnet
        ips.add(st.network.ip)
        assert cri.client.container_status(pod.containers[0]).status.state == pb.CONTAINER_RUNNING
    assert len(ips) == n
    shims = {pod.id: kubelet.shim_of(pod) for pod in pods}
    assert len(set(shims.values())) == n
    assert len(set(links_on_bridge(cri.bridge)) - veths_before) == n

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        list(ex.map(kubelet.remove_pod, pods))
    down = time.monotonic() - t
    _teardown_and_check(kubelet, pods, shims.values())
    assert not cri.processes_in_cgroups(), "processes left in the pods' cgroups"
    print(f"\n10 pods: up {up:.1f}s, down {down:.1f}s")
