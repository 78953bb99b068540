"""Units: a request's stream of engine output, as the gateway reads it."""

import asyncio

import pytest

from gateway.engines.client import RequestStream, StreamFailed
from protocol.messages import Delta, FailureKind, RequestFailed


def delta(i: int) -> Delta:
    return Delta("r", 0, str(i), [i], 1, None)


def test_engine_failure_comes_after_the_output_before_it():
    async def main():
        rs = RequestStream(["r"], None)
        rs.push(delta(1))
        rs.push(delta(2))
        rs.fail(RequestFailed("r", FailureKind.ENGINE_UNAVAILABLE, "gone"))
        assert [d.text for d in await rs.next()] == ["1", "2"]
        with pytest.raises(StreamFailed):
            await rs.next()

    asyncio.run(main())


def test_interrupt_ends_the_stream_at_once_even_while_output_keeps_coming():
    """A timeout must end a stream whose engine never pauses."""

    async def main():
        rs = RequestStream(["r"], None)
        rs.push(delta(1))
        rs.interrupt(TimeoutError("late"))
        rs.push(delta(2))
        with pytest.raises(TimeoutError):
            await rs.next()
        rs.fail(RequestFailed("r", FailureKind.ENGINE_UNAVAILABLE, "gone"))  # the first error wins
        with pytest.raises(TimeoutError):
            await rs.next()

    asyncio.run(main())


def test_interrupt_wakes_a_waiting_reader():
    async def main():
        rs = RequestStream(["r"], None)
        reader = asyncio.create_task(rs.next())
        await asyncio.sleep(0.01)
        rs.interrupt(ConnectionResetError())
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader, 5)

    asyncio.run(main())
