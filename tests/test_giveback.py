"""shim.daemon.giveback: one pass after a series of disconnects, none while idle."""

from __future__ import annotations

import trio
import trio.testing

from shim.daemon import giveback
from shim.daemon.giveback import GiveBack


def test_one_pass_after_the_last_disconnect_of_a_burst_then_rate_limited() -> None:
    async def main() -> None:
        g = GiveBack()
        async with trio.open_nursery() as nursery:
            await nursery.start(g.run)
            await trio.sleep(100)
            assert g.passes == 0  # idle: nothing
            for _ in range(5):  # a burst of disconnects, each within DELAY of the previous
                g.poke()
                await trio.sleep(giveback.DELAY * 0.6)
            assert g.passes == 0  # the burst has not ended DELAY ago yet
            await trio.sleep(giveback.DELAY * 0.5)
            assert g.passes == 1
            g.poke()  # right after a pass: the next waits out MIN_INTERVAL
            await trio.sleep(giveback.MIN_INTERVAL - giveback.DELAY)
            assert g.passes == 1
            await trio.sleep(giveback.DELAY * 1.1)
            assert g.passes == 2
            await trio.sleep(100)
            assert g.passes == 2
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
