"""Exits and states under concurrency (issue 10), over ttrpc with the test playing containerd
(integration/shim_driver.py) and real runc/crun underneath."""

from __future__ import annotations

import os
import signal

import trio

from integration.harness import pid_alive
from integration.shim_driver import EVENTUALLY, Lab, expect_error, wait_until
from integration.test_task_api_direct import exec_, process_spec, start_exec
from shim.proto import shim_pb2
from shim.ttrpc import Code


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
