"""The engine's loop watchdog: a loop held up is logged with where it was, once,
and its return with how long it was held."""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_gateway.engine.watchdog import LoopWatchdog


def a_synchronous_step(seconds: float) -> None:
    time.sleep(seconds)


def test_a_held_up_loop_is_logged_with_its_stack(caplog):
    async def main() -> None:
        dog = LoopWatchdog(asyncio.get_running_loop(), held_up_s=0.6)
        dog.start()
        await asyncio.sleep(0.6)  # running freely: nothing logged
        a_synchronous_step(1.8)
        await asyncio.sleep(1.2)  # the watchdog sees the loop back
        dog.stop()

    with caplog.at_level(logging.WARNING, logger="engine.watchdog"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "has not run for" in messages[0] and "a_synchronous_step" in messages[0]
    assert "runs again, after" in messages[1]
