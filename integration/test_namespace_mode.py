"""ShimGroup = "namespace": one shim process serves every task of a containerd namespace
(issue 9), through a private containerd and ``ctr``, with faults injected into some
containers while the others must stay served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from integration.harness import PY_RUNTIME, oci_runtime_binary, pid_alive, wait_for

EVENTUALLY = 60.0
TASKS = 20


@pytest.fixture
def ns_config(containerd, tmp_path: Path) -> Path:
    """Runtime options TOML selecting namespace mode (and the session's OCI runtime)."""
    path = tmp_path / "namespace-mode.toml"
    path.write_text(f'ShimGroup = "namespace"\nBinaryName = {json.dumps(oci_runtime_binary())}\n')
    return path


def run_ns(containerd, image, config: Path, cid: str, *cmd: str, extra=(), check=True) -> subprocess.CompletedProcess:
    return containerd.ctr("run", "-d", "--runtime", PY_RUNTIME, "--runtime-config-path", str(config),
                          *extra, image, cid, *cmd, check=check)


def address_of(containerd, cid: str) -> str:
    return (containerd.bundle_dir / cid / "address").read_text()


def shim_pid_of(containerd, cid: str) -> int:
    """The pid serving ``cid``: Connect through ``ctr`` is not exposed, so ask the socket's owner."""
    from integration.shim_driver import listening_pids

    path = address_of(containerd, cid).removeprefix("unix://")
    pids = listening_pids(path)
    assert len(pids) == 1, (cid, path, pids)
    return pids.pop()


def status(containerd, cid: str) -> str | None:
    task = containerd.tasks().get(cid)
    return task["status"] if task else None


def wait_status(containerd, cid: str, want: str) -> None:
    wait_for(lambda: status(containerd, cid) == want, timeout=EVENTUALLY,
             message=lambda: f"{cid} to be {want} (is {status(containerd, cid)})")


def start_many(containerd, image, config: Path, new_cid, n: int, tag: str) -> list[str]:
    ids = [new_cid(f"{tag}{i}") for i in range(n)]
    for cid in ids:
        run_ns(containerd, image, config, cid, "sleep", "1000")
    for cid in ids:
        wait_status(containerd, cid, "RUNNING")
    return ids


def still_served(containerd, ids: list[str], probe: str) -> None:
    """Every task answers State, runs an exec with the right output, and stays RUNNING."""
    tasks = containerd.tasks()
    assert all(tasks.get(cid, {}).get("status") == "RUNNING" for cid in ids), {c: tasks.get(c) for c in ids}
    for cid in ids[:: max(1, len(ids) // 5)]:
        out = containerd.ctr("task", "exec", "--exec-id", f"{probe}-{cid.rsplit('-', 1)[-1]}", cid, "echo", probe,
                             timeout=EVENTUALLY, check=False)
        assert (out.returncode, out.stdout.strip()) == (0, probe), out.stderr


def remove(containerd, ids: list[str]) -> None:
    for cid in ids:
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    for cid in ids:
        wait_for(lambda: status(containerd, cid) in ("STOPPED", None), timeout=EVENTUALLY, message=f"{cid} to stop")
        containerd.ctr("task", "rm", cid, check=False)
        containerd.ctr("containers", "rm", cid, check=False)


def test_one_shim_serves_every_task_and_exits_after_the_last(containerd, image, ns_config, new_cid) -> None:
    ids = start_many(containerd, image, ns_config, new_cid, TASKS, "ns")
    addresses = {address_of(containerd, cid) for cid in ids}
    assert len(addresses) == 1, addresses
    shim = shim_pid_of(containerd, ids[0])
    assert {shim_pid_of(containerd, cid) for cid in ids} == {shim}
    still_served(containerd, ids, "hello")

    # one task killed and deleted: the others, and the shim, stay
    containerd.ctr("task", "kill", "-s", "SIGKILL", ids[0])
    wait_status(containerd, ids[0], "STOPPED")
    containerd.ctr("task", "rm", ids[0])
    containerd.ctr("containers", "rm", ids[0])
    assert pid_alive(shim)
    still_served(containerd, ids[1:], "after-one")

    # an explicit group annotation still gets a shim of its own
    own = new_cid("own")
    run_ns(containerd, image, ns_config, own, "sleep", "1000", extra=("--label", "x=y", "--annotation",
                                                                      "io.containerd.runc.v2.group=mine"))
    wait_status(containerd, own, "RUNNING")
    assert address_of(containerd, own) not in addresses
    remove(containerd, [own])

    remove(containerd, ids[1:-1])
    assert pid_alive(shim), "the shim exited while a task was left"
    remove(containerd, ids[-1:])
    wait_for(lambda: not pid_alive(shim), timeout=EVENTUALLY, message=f"namespace shim {shim} to exit")
    leftovers = containerd.leftovers(ids + [own])
    assert not leftovers, leftovers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_tasks_reconnect_after_containerd_restarts(containerd, image, ns_config, new_cid, sig) -> None:
    ids = start_many(containerd, image, ns_config, new_cid, 5, f"rs{int(sig)}")
    shim = shim_pid_of(containerd, ids[0])
    containerd.restart(sig)
    assert pid_alive(shim)
    still_served(containerd, ids, "reconnected")
    containerd.ctr("task", "kill", "-s", "SIGKILL", ids[0])
    wait_status(containerd, ids[0], "STOPPED")  # its exit still reaches the new containerd
    assert {shim_pid_of(containerd, cid) for cid in ids} == {shim}
    remove(containerd, ids)
    wait_for(lambda: not pid_alive(shim), timeout=EVENTUALLY, message=f"namespace shim {shim} to exit")


FAILING_RUNTIME = """#!/bin/sh
for arg in "$@"; do [ "$arg" = start ] && {{ echo "injected start failure" >&2; exit 1; }}; done
exec {binary} "$@"
"""

CRASHING_LOGGER = """#!/bin/sh
exit 3
"""


def test_faults_in_one_container_leave_the_shim_and_the_others_served(
        containerd, image, ns_config, new_cid, tmp_path: Path) -> None:
    import shutil

    ids = start_many(containerd, image, ns_config, new_cid, TASKS, "keep")
    shim = shim_pid_of(containerd, ids[0])

    # a failing OCI runtime: that task's start fails with the runtime's message
    runtime = tmp_path / "failing-runtime"
    runtime.write_text(FAILING_RUNTIME.format(binary=shutil.which(oci_runtime_binary())))
    runtime.chmod(0o755)
    failing_config = tmp_path / "failing.toml"
    failing_config.write_text(f'ShimGroup = "namespace"\nBinaryName = "{runtime}"\n')
    bad = new_cid("badrt")
    out = run_ns(containerd, image, failing_config, bad, "true", check=False)
    assert out.returncode != 0 and "injected start failure" in out.stderr, out.stderr
    assert shim_pid_of(containerd, bad) == shim
    still_served(containerd, ids, "after-runtime")

    # a binary:// logger that dies at once: its container's output has nowhere to go
    logger = tmp_path / "crashing-logger"
    logger.write_text(CRASHING_LOGGER)
    logger.chmod(0o755)
    logged = new_cid("deadlog")
    run_ns(containerd, image, ns_config, logged, "sh", "-c", "while :; do echo spam; done",
           extra=("--log-uri", f"binary://{logger}"), check=False)
    still_served(containerd, ids, "after-logger")

    # a container flooding stdout that nobody reads (ctr run -d leaves no reader)
    flood = new_cid("flood")
    run_ns(containerd, image, ns_config, flood, "sh", "-c", "yes flood")
    wait_status(containerd, flood, "RUNNING")
    still_served(containerd, ids, "during-flood")
    containerd.ctr("task", "kill", "-s", "SIGKILL", flood)
    wait_status(containerd, flood, "STOPPED")

    # a vanished stdout fifo: the reader side removed under a running container
    vanish = new_cid("vanish")
    run_ns(containerd, image, ns_config, vanish, "sh", "-c", "while :; do echo x; sleep 0.01; done")
    wait_status(containerd, vanish, "RUNNING")
    for fifo in Path("/run/containerd/fifo").glob(f"*/{vanish}-std*"):
        fifo.unlink()
    still_served(containerd, ids, "after-vanish")

    assert pid_alive(shim)
    assert {shim_pid_of(containerd, cid) for cid in ids} == {shim}
    remove(containerd, [bad, logged, flood, vanish] + ids)
    wait_for(lambda: not pid_alive(shim), timeout=EVENTUALLY, message=f"namespace shim {shim} to exit")


GATED_LOGGER = """#!/bin/sh
# A binary:// logger that becomes ready (closes fd 5) only when the test opens its gate.
: > {gate}/entered
while [ ! -e {gate}/open ]; do sleep 0.02; done
exec 5>&-
exec cat <&3 >/dev/null
"""


def test_a_slow_logger_does_not_stall_the_other_tasks(containerd, image, ns_config, new_cid, tmp_path: Path) -> None:
    """The logger's readiness is awaited in the shim's loop, not read blocking (issue 10 item 5):
    while one task's Create waits for its logger, the shim's other tasks are served."""
    ids = start_many(containerd, image, ns_config, new_cid, 3, "busy")
    gate = tmp_path / "gate"
    gate.mkdir()
    logger = tmp_path / "gated-logger"
    logger.write_text(GATED_LOGGER.format(gate=gate))
    logger.chmod(0o755)
    slow = new_cid("slowlog")
    creating = containerd.ctr_popen("run", "-d", "--runtime", PY_RUNTIME, "--runtime-config-path", str(ns_config),
                                    "--log-uri", f"binary://{logger}", image, slow, "sh", "-c", "echo hi; sleep 1000")
    try:
        wait_for(lambda: (gate / "entered").exists(), timeout=EVENTUALLY, message="the logger to start")
        assert creating.poll() is None  # its Create is waiting for the logger
        still_served(containerd, ids, "while-logger-waits")  # answered while the gate is shut
    finally:
        (gate / "open").touch()
        creating.communicate(timeout=EVENTUALLY)
    assert creating.returncode == 0
    wait_status(containerd, slow, "RUNNING")
    remove(containerd, ids + [slow])


FAIR_TASKS = int(os.environ.get("SHIM_FAIRNESS_TASKS", "50"))
FLOODERS = 10


def test_fair_and_responsive_while_ten_tasks_flood_stdout(containerd, image, ns_config, new_cid) -> None:
    """State/Kill/Exec answered and every flooder's output moving while 10 of them flood
    (SHIM_FAIRNESS_TASKS=200 for the issue's full size; make test runs 50)."""
    quiet = start_many(containerd, image, ns_config, new_cid, FAIR_TASKS - FLOODERS, "q")
    readers: list[subprocess.Popen] = []
    flooders = [new_cid(f"f{i}") for i in range(FLOODERS)]
    try:
        for cid in flooders:  # attached ctr run: a reader that keeps reading each flood
            readers.append(containerd.ctr_popen(
                "run", "--runtime", PY_RUNTIME, "--runtime-config-path", str(ns_config), image, cid,
                "sh", "-c", "yes flood-output-line"))
        for cid in flooders:
            wait_status(containerd, cid, "RUNNING")
        # every flood makes progress: each reader receives data (no stream starves another)
        for reader in readers:
            assert reader.stdout is not None
            assert reader.stdout.read(1 << 16).count(b"flood-output-line") > 100
        still_served(containerd, quiet, "fair")
        victim = quiet[0]
        containerd.ctr("task", "kill", "-s", "SIGKILL", victim)
        wait_status(containerd, victim, "STOPPED")
        for reader in readers:  # still moving after all that
            assert reader.stdout is not None and reader.stdout.read(1 << 16)
    finally:
        for cid in flooders:
            containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        for reader in readers:
            if reader.stdout is not None:
                reader.stdout.close()
            try:
                reader.wait(timeout=EVENTUALLY)
            except subprocess.TimeoutExpired:
                os.kill(reader.pid, signal.SIGKILL)
                reader.wait()
    remove(containerd, quiet + flooders)


#: After the hostile set, the shim's Rss must be back within this of where it started (issue 16).
RSS_GIVEN_BACK = 5 * 2**20


def test_memory_is_given_back_after_hostile_clients(containerd, image, ns_config, new_cid) -> None:
    """1000 idle connections, then 10 000 requests pipelined by a client that never reads a
    reply, all closed: the namespace shim's Rss comes back within 5 MiB of where it was.

    A bound on resources, not on time: the condition is waited for (the shim gives memory
    back ~1 s after the last disconnect). Without shim.daemon.giveback the burst's cycles and
    freed heap stay (~+10 MiB)."""
    from soak.common import memory
    from soak.hostile import idle_connections, pipelined
    from soak.wire import state

    cid = new_cid("hostile")
    run_ns(containerd, image, ns_config, cid, "sleep", "100000")
    try:
        wait_status(containerd, cid, "RUNNING")
        shim = shim_pid_of(containerd, cid)
        path = address_of(containerd, cid).removeprefix("unix://")

        def rss() -> int:
            m = memory(shim)
            assert m is not None, f"shim {shim} is gone"
            return m["rss"]

        for _ in range(20):  # what a first call caches counts in the start figure
            assert state(path, cid, containerd.namespace)[0] == 0
        start = rss()
        idle = idle_connections(path, shim, cid, containerd.namespace, 1000)
        piped = pipelined(path, shim, cid, containerd.namespace, 10000)
        assert idle["state_code"] == 0 and piped["state_code"] == 0, (idle, piped)
        # the set really made the shim allocate (else the bound below proves nothing)
        assert max(idle["rss_during"], piped["rss_during"]) > start + RSS_GIVEN_BACK, (start, idle, piped)
        wait_for(lambda: rss() <= start + RSS_GIVEN_BACK, timeout=EVENTUALLY,
                 message=lambda: f"shim Rss back within 5 MiB of {start / 2**20:.1f} MiB (is {rss() / 2**20:.1f} MiB)")
        assert state(path, cid, containerd.namespace)[0] == 0
    finally:  # a failed bound must not leave this shim, still bloated, to the next tests
        remove(containerd, [cid])
