"""Exits and states under concurrency (issue 10), over ttrpc with the test playing containerd
(integration/shim_driver.py) and real runc/crun underneath."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import trio

from integration.harness import pid_alive
from integration.shim_driver import EVENTUALLY, Lab, expect_error, oci_runtime, runc_options, wait_until
from integration.test_task_api_direct import exec_, process_spec, start_exec
from shim.proto import shim_pb2, task_types_pb2
from shim.ttrpc import Code, TTRPCError


async def test_no_exec_once_the_init_is_reaped(lab: Lab) -> None:
    """Item 2: the init stays RUNNING while its output is still being taken (its exit waits
    for that), but once it is reaped an exec is refused with FailedPrecondition, as in Go:
    an exec now could only fail in runc, or exit after the init's exit went out."""
    sink = await lab.start_sink()
    cid = lab.new_id("reaped")
    bundle = lab.bundle(cid, ["sh", "-c", "while :; do echo line; done"])
    out = lab.tmp / "init-stdout"
    os.mkfifo(out)
    reader = os.open(out, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    shim = await lab.start_shim(cid, bundle)
    init = (await shim.create(cid, bundle, stdout=str(out))).pid
    await shim.start(cid)
    await exec_(shim, cid, "early", process_spec(bundle, ["true"]))
    reading = True

    async def read_slowly() -> None:  # someone is there: the output keeps moving
        while reading:
            try:
                os.read(reader, 4096)
            except BlockingIOError:
                pass
            await trio.sleep(0.02)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            os.kill(init, signal.SIGKILL)
            await wait_until(lambda: not pid_alive(init), EVENTUALLY, message="the shim to reap the init")
            await expect_error(Code.FAILED_PRECONDITION, exec_(shim, cid, "late", process_spec(bundle, ["true"])))
            await expect_error(Code.FAILED_PRECONDITION, start_exec(shim, cid, "early"))
            reading = False
        assert (await shim.wait(cid)).exit_status == 137
    finally:
        os.close(reader)
    assert "/tasks/exec-started" not in sink.topics()
    await shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id="early"))
    await shim.delete(cid)
    await shim.shutdown(cid)
    await wait_until(lambda: not pid_alive(shim.pid), EVENTUALLY, message=f"shim {shim.pid} to exit")


def delaying_runtime(lab: Lab) -> tuple[str, Path, Path]:
    """An OCI runtime wrapper (as BinaryName) that parks every `exec` until ``release`` exists,
    logging one line per parked exec to ``calls``, then runs the real runtime: what containerd's
    runc-fp "delayExec" failpoint does for its TestIssue10589."""
    calls, release = lab.tmp / "exec-calls", lab.tmp / "exec-release"
    wrapper = lab.tmp / "delay-exec-runtime"
    real = shutil.which(oci_runtime())
    assert real, oci_runtime()
    wrapper.write_text(f"""#!/bin/sh
for arg in "$@"; do
    if [ "$arg" = exec ]; then
        echo exec >> '{calls}'
        while [ ! -e '{release}' ]; do sleep 0.02; done
        break
    fi
done
exec '{real}' "$@"
""")
    wrapper.chmod(0o755)
    return str(wrapper), calls, release


async def test_exec_created_while_the_init_exit_is_held(lab: Lab) -> None:
    """containerd's TestIssue10589 (issue 18, item 2): exec1 is parked inside `runc exec`, so
    the init's exit is held; the init is SIGKILLed and reaped; exec2 is created. As in Go, the
    task is still running while its exit is held (State, Create of exec2), exec2's Start is
    refused ("init process is not running": FailedPrecondition) without reaching the runtime,
    and once exec1's runc exec fails the init's exit goes out. Before: State said stopped and
    exec2's Create was refused ("cannot exec in a stopped container")."""
    sink = await lab.start_sink()
    cid = lab.new_id("held")
    bundle = lab.bundle(cid, ["sleep", "1000"])
    wrapper, calls, release = delaying_runtime(lab)
    shim = await lab.start_shim(cid, bundle, ttrpc_address=sink.path)
    init = (await shim.create(cid, bundle, options=runc_options(binary_name=wrapper))).pid
    await shim.start(cid)
    await exec_(shim, cid, "exec1", process_spec(bundle, ["sleep", "301"]))
    outcome: list[str] = []

    async def start_exec1() -> None:
        try:
            await start_exec(shim, cid, "exec1")
            outcome.append("ok")
        except TTRPCError as e:
            outcome.append(e.code.name)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_exec1)
            await wait_until(calls.exists, EVENTUALLY, message="exec1's runc exec to be parked")
            os.kill(init, signal.SIGKILL)
            await wait_until(lambda: not os.path.exists(f"/proc/{init}"), EVENTUALLY,
                             message="the shim to reap the init")
            assert (await shim.state(cid)).status == task_types_pb2.RUNNING  # held: still running
            await exec_(shim, cid, "exec2", process_spec(bundle, ["sleep", "302"]))  # accepted, as in Go
            await expect_error(Code.FAILED_PRECONDITION, start_exec(shim, cid, "exec2"),
                               contains="init process is not running")
            assert calls.read_text().splitlines() == ["exec"]  # exec2 never reached the runtime
            assert "/tasks/exit" not in sink.topics()
            release.touch()
    finally:
        release.touch()
    assert outcome == ["FAILED_PRECONDITION"]  # runc exec in a dead container
    assert (await shim.wait(cid)).exit_status == 137
    assert (await shim.state(cid)).status == task_types_pb2.STOPPED
    for eid in ("exec1", "exec2"):
        await shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=eid))
    await shim.delete(cid)
    await wait_until(lambda: sink.topics()[-1:] == ["/tasks/delete"], EVENTUALLY, message="the delete event")
    topics = sink.topics()
    assert "/tasks/exec-started" not in topics
    assert topics.count("/tasks/exec-added") == 2 and topics.count("/tasks/exit") == 1, topics
    check_event_sequence(sink.events, cid)
    await shim.shutdown(cid)
    await wait_until(lambda: not pid_alive(shim.pid), EVENTUALLY, message=f"shim {shim.pid} to exit")


#: What a request racing others on one task may get besides success: the documented codes.
RACE_CODES = {Code.FAILED_PRECONDITION, Code.NOT_FOUND, Code.ALREADY_EXISTS}


def check_event_sequence(events: list, cid: str) -> None:
    """containerd's rules for one task's events: create first; start at most once; every
    exec added before it starts, and an exit exactly once per started process, after its
    start; the execs' exits before the init's; delete once, last."""
    topics = [e.topic for e in events]
    assert topics[0] == "/tasks/create" and topics.count("/tasks/create") == 1, topics
    assert topics.count("/tasks/start") <= 1, topics
    assert topics.count("/tasks/delete") == 1 and topics[-1] == "/tasks/delete", topics
    seen: dict[str, list[str]] = {}
    for e in events[1:-1]:
        process = {"/tasks/start": cid, "/tasks/exit": getattr(e.event, "id", ""),
                   "/tasks/exec-added": getattr(e.event, "exec_id", ""),
                   "/tasks/exec-started": getattr(e.event, "exec_id", "")}.get(e.topic, "")
        if process:  # paused/resumed/oom: not about one process's life
            seen.setdefault(process, []).append(e.topic)
    for process, its in seen.items():
        if process == cid:  # killed before it started: an exit and no start, as in Go
            assert its in (["/tasks/start", "/tasks/exit"], ["/tasks/exit"]), (process, its)
        else:
            assert its in (["/tasks/exec-added"], ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]), (
                process, its)
    if "/tasks/start" in topics:
        init_exit = next(i for i, e in enumerate(events) if e.topic == "/tasks/exit" and e.event.id == cid)
        exec_exits = [i for i, e in enumerate(events) if e.topic == "/tasks/exit" and e.event.id != cid]
        assert all(i < init_exit for i in exec_exits), topics


async def _race(name_calls: list, rng) -> list[tuple[str, str]]:
    """Send every call at once (in a shuffled order); each one's outcome: "ok" or its code."""
    outcomes: list[tuple[str, str]] = []

    async def attempt(name: str, call) -> None:
        try:
            await call()
            outcomes.append((name, "ok"))
        except TTRPCError as e:
            # an undocumented code carries its message: a failure says what the shim answered
            outcomes.append((name, e.code.name if e.code in RACE_CODES else str(e)))

    calls = list(name_calls)
    rng.shuffle(calls)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for name, call in calls:
                nursery.start_soon(attempt, name, call)
    return outcomes


async def _finish(shim, cid: str, exec_ids: list[str]) -> None:
    """Stop the task whatever a race left, take every process out, delete it."""
    with contextlib.suppress(TTRPCError):
        await shim.kill(cid, signal.SIGKILL)
    with contextlib.suppress(TTRPCError):
        await shim.wait(cid)
    for eid in exec_ids:
        with contextlib.suppress(TTRPCError):
            await shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=eid))
    with contextlib.suppress(TTRPCError):
        await shim.delete(cid)


async def test_200_concurrent_requests_on_one_task_get_documented_codes_and_valid_events(lab: Lab) -> None:
    """Item 1: requests sent at once on one task, 200 per round: each succeeds or gets
    FailedPrecondition/NotFound/AlreadyExists, and the shim's events form a valid sequence.
    Rounds: Start‖Start‖Delete‖State on a created task (Delete may win or lose); Pause‖Resume
    on a running one; Exec, exec Start and exec Delete of 60 execs with Kills of the task
    among them. Without the per-process lock, two Starts (or two Pauses) both pass the state
    check and the second runtime call fails: Unknown."""
    import random

    rng = random.Random(10)
    sink = await lab.start_sink()
    for round in range(3):
        cid = lab.new_id(f"race{round}")
        bundle = lab.bundle(cid, ["sleep", "1000"])
        shim = await lab.start_shim(cid, bundle, ttrpc_address=sink.path)
        first = len(sink.events)
        await shim.create(cid, bundle)
        exec_ids: list[str] = []
        if round == 0:  # created: Start and Delete race
            ops = [("start", lambda: shim.start(cid))] * 90 + [("delete", lambda: shim.delete(cid))] * 20
            ops += [("state", lambda: shim.state(cid))] * 90
        elif round == 1:  # running: Pause and Resume race
            await shim.start(cid)
            ops = [("pause", lambda: shim.call("Pause", shim_pb2.PauseRequest(id=cid)))] * 100
            ops += [("resume", lambda: shim.call("Resume", shim_pb2.ResumeRequest(id=cid)))] * 100
        else:  # running: execs come and go while the task is killed
            await shim.start(cid)
            ops = [("kill", lambda: shim.kill(cid, signal.SIGKILL))] * 5
            ops += [("state", lambda: shim.state(cid))] * 15
            for n in range(60):
                eid = f"e{n}"
                exec_ids.append(eid)
                spec = process_spec(bundle, ["sh", "-c", f"exit {n % 5}"])
                ops += [(f"exec {eid}", lambda eid=eid, spec=spec: exec_(shim, cid, eid, spec)),
                        (f"start {eid}", lambda eid=eid: start_exec(shim, cid, eid)),
                        (f"delete {eid}", lambda eid=eid: shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=eid)))]
        assert len(ops) == 200
        outcomes = await _race(ops, rng)
        assert len(outcomes) == 200
        bad = [(name, o) for name, o in outcomes if o != "ok" and o not in {c.name for c in RACE_CODES}]
        assert not bad, bad
        if round == 1:
            state = await shim.state(cid)
            # every Pause and Resume that succeeded published its event; they reach the sink
            # after their replies: wait for all of them before counting
            ok = {name: sum(o == "ok" for n, o in outcomes if n == name) for name in ("pause", "resume")}

            def counts() -> tuple[int, int]:
                topics = [e.topic for e in sink.events[first:]]
                return topics.count("/tasks/paused"), topics.count("/tasks/resumed")
            await wait_until(lambda: counts() == (ok["pause"], ok["resume"]), EVENTUALLY,
                             message=lambda: f"{ok} paused/resumed events; have {counts()}")
            paused = ok["pause"] - ok["resume"]
            assert paused == (1 if state.status == task_types_pb2.PAUSED else 0), (state.status, counts())
            with contextlib.suppress(TTRPCError):
                await shim.call("Resume", shim_pb2.ResumeRequest(id=cid))
        await _finish(shim, cid, exec_ids)
        await wait_until(lambda: sink.topics()[-1:] == ["/tasks/delete"], EVENTUALLY,
                         message=lambda: f"the task's delete event; have {sink.topics()[first:]}")
        check_event_sequence(sink.events[first:], cid)
        await shim.shutdown(cid)
        await wait_until(lambda: not pid_alive(shim.pid), EVENTUALLY, message=f"shim {shim.pid} to exit")
