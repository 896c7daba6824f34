"""Exits and states under concurrency (issue 10), over ttrpc with the test playing containerd
(integration/shim_driver.py) and real runc/crun underneath."""

from __future__ import annotations

import contextlib
import os
import signal

import trio

from integration.harness import pid_alive
from integration.shim_driver import EVENTUALLY, Lab, expect_error, wait_until
from integration.test_task_api_direct import exec_, process_spec, start_exec
from shim.proto import shim_pb2
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


async def test_200_concurrent_requests_on_one_task_get_documented_codes_and_valid_events(lab: Lab) -> None:
    """Item 1: Start, Kill, Exec, exec Start, Delete (task and exec) and State sent at once,
    200 of them, on one task: each succeeds or gets FailedPrecondition/NotFound/AlreadyExists,
    and the events the shim sent form a valid sequence (run twice: Delete can win the race
    against Start, or lose it)."""
    import random

    for round in range(2):
        rng = random.Random(round)
        sink = await lab.start_sink(str(lab.tmp / f"ev{round}.sock"))
        cid = lab.new_id(f"race{round}")
        bundle = lab.bundle(cid, ["sleep", "1000"])
        shim = await lab.start_shim(cid, bundle, ttrpc_address=sink.path)
        await shim.create(cid, bundle)
        outcomes: list[tuple[str, str]] = []

        async def attempt(name: str, call) -> None:
            try:
                await call()
                outcomes.append((name, "ok"))
            except TTRPCError as e:
                outcomes.append((name, e.code.name))
                assert e.code in RACE_CODES, f"{name}: {e}"

        def exec_ops(n: int) -> list:
            eid = f"e{n}"
            spec = process_spec(bundle, ["sh", "-c", f"exit {n % 5}"])
            return [(f"exec {eid}", lambda: exec_(shim, cid, eid, spec)),
                    (f"start {eid}", lambda: start_exec(shim, cid, eid)),
                    (f"delete {eid}", lambda: shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=eid)))]

        ops = [("start", lambda: shim.start(cid))] * 10
        ops += [("kill", lambda: shim.kill(cid, signal.SIGKILL))] * 5
        ops += [("delete", lambda: shim.delete(cid))] * (5 if round else 1)
        ops += [("state", lambda: shim.state(cid))] * 10
        for n in range(57):
            ops += exec_ops(n)
        ops = ops[:200]
        rng.shuffle(ops)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for name, call in ops:
                    nursery.start_soon(attempt, name, call)
        # Finish the task whatever the race left: stop it, take every process out, delete.
        with contextlib.suppress(TTRPCError):
            await shim.kill(cid, signal.SIGKILL)
        with contextlib.suppress(TTRPCError):
            await shim.wait(cid)
        for n in range(57):
            with contextlib.suppress(TTRPCError):
                await shim.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=f"e{n}"))
        with contextlib.suppress(TTRPCError):
            await shim.delete(cid)
        await wait_until(lambda: sink.topics()[-1:] == ["/tasks/delete"], EVENTUALLY,
                         message=lambda: f"the task's delete event; have {sink.topics()}")
        check_event_sequence(sink.events, cid)
        assert len(outcomes) == 200
        await shim.shutdown(cid)
        await wait_until(lambda: not pid_alive(shim.pid), EVENTUALLY, message=f"shim {shim.pid} to exit")
        sink.stop()
