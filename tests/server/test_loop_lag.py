"""The event-loop lag signal that sheds load the batcher's queue cannot see."""

from __future__ import annotations

import asyncio
import time

from server.api import LoopLag


def test_loop_lag_rises_when_the_loop_is_blocked_and_decays_when_it_is_free() -> None:
    async def scenario() -> tuple[float, float]:
        lag = LoopLag()
        task = asyncio.create_task(lag.run())
        for _ in range(10):           # something hogs the loop (parsing under overload)
            time.sleep(0.05)          # the scenario: blocking the loop, not a wait
            await asyncio.sleep(0.011)
        busy = lag.value
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10   # a free loop: the lag decays (bounded wait)
        while lag.value >= busy / 4 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        return busy, lag.value

    busy, free = asyncio.run(scenario())
    assert busy > 0.01 and free < busy / 4
