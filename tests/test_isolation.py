"""shim.daemon.isolation.Isolated: one container's failing task never stops the shim's nursery."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from shim.daemon.isolation import Isolated


async def test_a_failing_task_is_logged_and_counted_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    finished: list[str] = []
    release = trio.Event()

    async def broken() -> None:
        raise RuntimeError("copier crashed")

    async def healthy(name: str) -> None:
        await release.wait()
        finished.append(name)

    with caplog.at_level(logging.ERROR, logger="shim.isolation"):
        async with trio.open_nursery() as nursery:
            bad, good = Isolated(nursery, "c-bad"), Isolated(nursery, "c-good")
            good.start_soon(healthy, "good")
            bad.start_soon(broken)
            bad.start_soon(healthy, "bad-but-alive")
            await trio.testing.wait_all_tasks_blocked()
            assert bad.faults == 1 and good.faults == 0
            assert not nursery.cancel_scope.cancel_called
            release.set()
    assert sorted(finished) == ["bad-but-alive", "good"]
    assert "c-bad" in caplog.text and "copier crashed" in caplog.text


async def test_cancellation_still_reaches_isolated_tasks() -> None:
    cancelled = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    async with trio.open_nursery() as nursery:
        Isolated(nursery, "c").start_soon(forever)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert cancelled == [True]
