"""The warm template (shim/template.py): shims forked from it, and every way it can fail.

Correctness must never depend on the template: when it is missing, killed,
stopped or disabled, containers still start (the launcher spawns the shim),
and running shims are never affected, since they are not its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from integration.harness import (
    EVENTUALLY,
    PY_RUNTIME,
    SHIM_SOCKET_DIR,
    Containerd,
    pid_alive,
    read_cmdline,
    read_status,
    shim_group,
    shim_pids,
    unix_socket_holders,
    wait_for,
)

RUNTIME = os.environ.get("SHIM_RUNTIME", PY_RUNTIME)
pytestmark = [
    pytest.mark.skipif(RUNTIME != PY_RUNTIME, reason="the template is this shim's own"),
    pytest.mark.skipif(shim_group() == "namespace",
                       reason="forks one shim per task; namespace mode's one shim: test_namespace_mode.py"),
]


def run_detached(containerd: Containerd, image: str, cid: str) -> int:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "120")
    [shim] = wait_for(lambda: shim_pids(cid, address=containerd.address), message=f"shim of {cid}")
    return shim


def remove(containerd: Containerd, cid: str) -> None:
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    wait_for(lambda: containerd.tasks().get(cid, {}).get("status") in (None, "STOPPED"), message=f"{cid} stopped")
    containerd.ctr("task", "rm", cid, check=False)
    containerd.ctr("c", "rm", cid, check=False)


def warm_template(containerd: Containerd, image: str, new_cid) -> int:
    """The template, started as in production: by the second start that finds none (the first
    start of a containerd only marks one as wanted, shim/template.py wanted)."""
    for k in range(2):
        if containerd.template_pid():
            break
        run_detached(containerd, image, new_cid(f"warm{k}"))
    return wait_for(containerd.template_pid, message="a template")


def forked(pid: int) -> bool:
    """Forked from the template (fork, setsid, fork): a member of the session its middle
    process leads. A spawned shim (start_new_session) leads a session of its own. Both
    carry the Go shim's title (``containerd-shim-runc-v2-py -namespace ...``), so argv
    cannot tell them apart."""
    argv = read_cmdline(pid) or []
    return bool(argv) and argv[0] == "containerd-shim-runc-v2-py" and os.getsid(pid) != pid


def exec_works(containerd: Containerd, cid: str) -> bool:
    r = containerd.ctr("task", "exec", "--exec-id", f"probe{time.monotonic_ns()}", cid, "echo", "alive", check=False)
    return r.returncode == 0 and r.stdout == "alive\n"


def test_shims_fork_from_the_template(containerd, image, new_cid):
    second = new_cid("b")
    template = warm_template(containerd, image, new_cid)
    shim = run_detached(containerd, image, second)
    assert forked(shim), read_cmdline(shim)
    assert read_status(shim)["PPid"] != str(template), "the shim must not be the template's child"
    assert read_status(shim)["THP_enabled"] == "0"
    assert read_status(template)["THP_enabled"] == "0"
    assert exec_works(containerd, second)
    remove(containerd, second)
    wait_for(lambda: not pid_alive(shim), timeout=EVENTUALLY, message="forked shim exit")


def _devnull_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    return count


def test_a_forked_shim_holds_its_own_fd_reserve(containerd, image, new_cid):
    """The fds that keep every task killable at the open-file limit (shim.common.nofile.Reserve)
    are the shim's own: the template's warm-up filled the reserve object every shim inherits,
    but no fork path passes its fds on, and a forked shim that believed it held them had
    none (and would have closed other files in their place when it needed them)."""
    from shim.common.nofile import RESERVE

    second = new_cid("reserve")
    template = warm_template(containerd, image, new_cid)
    shim = run_detached(containerd, image, second)
    assert forked(shim), read_cmdline(shim)
    assert _devnull_fds(shim) >= RESERVE, _devnull_fds(shim)  # (its stdio are /dev/null too)
    assert _devnull_fds(template) <= 3, "the template serves no task: it holds no reserve"
    assert exec_works(containerd, second)
    remove(containerd, second)


def test_killing_the_template_touches_no_shim_and_starts_still_work(containerd, image, new_cid):
    before, after = new_cid("before"), new_cid("after")
    template = warm_template(containerd, image, new_cid)
    shim = run_detached(containerd, image, before)
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: not pid_alive(template), message="template gone")
    assert pid_alive(shim)
    assert exec_works(containerd, before)
    run_detached(containerd, image, after)  # falls back to spawning, and brings a new template
    assert exec_works(containerd, after)
    replacement = wait_for(containerd.template_pid, message="a new template")
    assert replacement != template
    remove(containerd, before)
    remove(containerd, after)


def test_a_stopped_template_is_replaced_and_never_causes_two_shims(containerd, image, new_cid):
    """A SIGSTOPped template: the start does not wait out a timeout, kills the stopped template
    (it could only ever answer late) and starts a new one, which its shim and later starts fork
    from (issue 11 item 6; the start waits for the new template rather than spawning a shim,
    or spawns one if it is not up in time). One shim per socket throughout."""
    template = warm_template(containerd, image, new_cid)
    cid = new_cid("stopped")
    os.kill(template, signal.SIGSTOP)
    try:
        containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "120")
        wait_for(lambda: not pid_alive(template), message=f"the stopped template {template} to be retired")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(template, signal.SIGCONT)
    shims = shim_pids(cid, address=containerd.address)
    assert len(shims) == 1, shims
    socket = str(SHIM_SOCKET_DIR / containerd.shim_socket_name(cid))
    assert unix_socket_holders([socket])[socket] == {shims[0]}
    assert exec_works(containerd, cid)
    successor = wait_for(lambda: (pid := containerd.template_pid()) not in (None, template) and pid,
                         message="a new template")
    # once warm (its warm-up takes a moment; a start before that falls back), it serves starts
    for attempt in range(20):
        later = new_cid(f"later{attempt}")
        later_shim = run_detached(containerd, image, later)
        served = forked(later_shim)
        remove(containerd, later)
        if served:
            break
    assert served, "no start was forked from the new template"
    assert containerd.template_pid() == successor
    remove(containerd, cid)


def test_a_single_task_runs_without_a_template_and_a_second_start_brings_one(image):
    """One task: its shim is spawned and no template is started (it would cost its whole heap
    for nothing); the second start launches it, and the third forks from it."""
    with Containerd(log_level="info") as containerd:
        tar = containerd.dir / "busybox.tar"
        from integration.harness import build_busybox_image

        build_busybox_image(tar, image)
        containerd.import_image(tar)
        ids = [f"lazy-{os.getpid()}-{i}" for i in range(3)]
        first = run_detached(containerd, image, ids[0])
        assert not forked(first)
        assert containerd.template_pid() is None
        assert exec_works(containerd, ids[0])
        assert containerd.template_pid() is None  # still: nothing but a start launches it
        run_detached(containerd, image, ids[1])
        wait_for(containerd.template_pid, message="a template after the second start")
        served = False
        for attempt in range(20):  # once warm (a start during its warm-up falls back to spawning)
            cid = f"lazy-{os.getpid()}-later{attempt}"
            served = forked(run_detached(containerd, image, cid))
            remove(containerd, cid)
            if served:
                break
        assert served, "no start was forked from the template"
        for cid in ids[:2]:
            remove(containerd, cid)


def test_disabled_template_spawns_every_shim(image):
    with Containerd(log_level="info", extra_env={"SHIM_PY_TEMPLATE": "0"}) as containerd:
        tar = containerd.dir / "busybox.tar"
        from integration.harness import build_busybox_image

        build_busybox_image(tar, image)
        containerd.import_image(tar)
        ids = [f"notemplate-{os.getpid()}-{i}" for i in range(2)]
        shims = [run_detached(containerd, image, cid) for cid in ids]
        assert containerd.template_pid() is None
        assert not any(forked(pid) for pid in shims)
        for cid in ids:
            assert exec_works(containerd, cid)
            remove(containerd, cid)


def test_templates_stopped_during_50_starts_never_cause_two_shims_on_a_socket(containerd, image, new_cid):
    """Issue 10 item 6: 50 starts, 10 at a time, while every template that appears is
    SIGSTOPped (the stopped one is retired and a new one started, which is stopped in turn):
    each container ends up with exactly one shim, and each shim socket with one holder."""
    from concurrent.futures import ThreadPoolExecutor

    warm_template(containerd, image, new_cid)
    ids = [new_cid(f"s{i}") for i in range(50)]
    stopped: set[int] = set()
    done = False

    def stop_templates() -> None:
        while not done:
            pid = containerd.template_pid()
            if pid and pid not in stopped and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
            time.sleep(0.005)  # a poller, not a wait: it races the starts on purpose

    try:
        with ThreadPoolExecutor(max_workers=11) as pool:
            stopper = pool.submit(stop_templates)
            results = list(pool.map(
                lambda cid: containerd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "120",
                                           check=False), ids))
            done = True
            stopper.result()
    finally:
        done = True
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert [r.returncode for r in results] == [0] * 50, [r.stderr for r in results if r.returncode]
    assert stopped, "no template was ever stopped"
    for cid in ids:
        shims = shim_pids(cid, address=containerd.address)
        assert len(shims) == 1, (cid, shims)
        socket = str(SHIM_SOCKET_DIR / containerd.shim_socket_name(cid))
        assert unix_socket_holders([socket])[socket] == {shims[0]}, cid
    for cid in ids:
        remove(containerd, cid)
