"""Task/State through the task service: the reply it keeps between polls follows the process."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fake_runtime import Harness, make_container

from shim.daemon.service import TaskService
from shim.proto import shim_pb2, task_types_pb2
from shim.ttrpc import CallContext

pytestmark = pytest.mark.trio


def poll(service: TaskService, id: str) -> shim_pb2.StateResponse:
    ctx = CallContext("containerd.task.v2.Task", "State")
    return shim_pb2.StateResponse.FromString(service.state(shim_pb2.StateRequest(id=id), ctx))


def serving(h: Harness) -> TaskService:
    service = TaskService(h.container.ctx)
    service.containers[h.container.id] = h.container
    return service


async def test_state_follows_create_start_and_exit(tmp_path: Path) -> None:
    """Each poll between the changes is answered from what was kept; each change shows at once."""
    async with trio.open_nursery() as nursery:
        h = make_container(str(tmp_path), nursery)
        service = serving(h)
        await h.container.create()
        seen = [poll(service, "c1") for _ in range(2)]
        await h.container.start()
        seen += [poll(service, "c1") for _ in range(2)]
        h.runtime.exit(h.runtime.init_pid, 7)
        await h.container.init.wait()
        seen += [poll(service, "c1") for _ in range(2)]
        assert [s.status for s in seen] == [task_types_pb2.CREATED] * 2 + [task_types_pb2.RUNNING] * 2 + [
            task_types_pb2.STOPPED] * 2
        assert {s.pid for s in seen} == {h.runtime.init_pid}
        assert [s.exit_status for s in seen] == [0, 0, 0, 0, 7, 7]
        assert seen[-1].exited_at.ToNanoseconds() > 0 and seen[-1].bundle == str(tmp_path)


async def test_a_recreated_task_of_the_same_id_is_not_answered_from_the_old_one(tmp_path: Path) -> None:
    """Same id, pid and status as the task before it, but another process (and bundle)."""
    async with trio.open_nursery() as nursery:
        harnesses = []
        for name in ("old", "new"):
            (tmp_path / name).mkdir()
            harnesses.append(h := make_container(str(tmp_path / name), nursery))
            await h.container.create()
            await h.container.start()
        old, new = harnesses
        service = serving(old)
        assert poll(service, "c1").bundle == str(tmp_path / "old")
        service.containers["c1"] = new.container
        state = poll(service, "c1")
        assert (state.bundle, state.pid) == (str(tmp_path / "new"), new.runtime.init_pid)
        assert new.runtime.init_pid == old.runtime.init_pid  # what makes it a test of the keying
        for h in harnesses:
            h.runtime.exit(h.runtime.init_pid, 0)
            await h.container.init.wait()
