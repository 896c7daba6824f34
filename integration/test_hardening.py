"""Defects found by the fault and abuse campaign (issue 11), each reproduced over ttrpc with the
test playing containerd (integration/shim_driver.py), real runc/crun underneath."""

from __future__ import annotations

from integration.shim_driver import Lab
from integration.test_task_api_direct import finish


async def test_existing_regular_file_as_stdout_and_stderr_is_appended_to(lab: Lab) -> None:
    """Item 3: never truncate or overwrite a plain file named as stdio (the Go shim appends)."""
    await lab.start_sink()
    cid = lab.new_id("regfile")
    bundle = lab.bundle(cid, ["sh", "-c", "echo NEW-OUT; echo NEW-ERR >&2"])
    log = lab.tmp / "existing.log"
    log.write_text("LINE-1\nLINE-2\n")
    shim = await lab.start_shim(cid, bundle)
    await shim.create(cid, bundle, stdout=str(log), stderr=str(log))
    await shim.start(cid)
    assert (await shim.wait(cid)).exit_status == 0
    text = log.read_text()
    assert text.startswith("LINE-1\nLINE-2\n"), text
    assert sorted(text.splitlines()[2:]) == ["NEW-ERR", "NEW-OUT"], text
    await finish(shim, cid)
    assert log.read_text() == text  # and nothing after


async def test_shutdown_now_neither_exits_nor_kills_while_a_task_runs(lab: Lab) -> None:
    """Item 4: Shutdown{now: true} is answered, the task lives on, the shim serves on."""
    from integration.harness import pid_alive
    from integration.test_task_api_direct import running_task
    from shim.proto import task_types_pb2

    await lab.start_sink()
    shim, cid, _, init = await running_task(lab, "shutnow")
    await shim.shutdown(cid, now=True)
    assert (await shim.connect(cid)).task_pid == init
    assert pid_alive(init) and (await shim.state(cid)).status == task_types_pb2.RUNNING
    await finish(shim, cid)  # kill, wait, delete: and then the shim does exit
