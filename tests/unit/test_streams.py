"""Units: a request's stream of engine output, as the gateway reads it."""

import asyncio

import pytest

from vllm_gateway.gateway.engines.streams import RequestStream, StreamFailed
from vllm_gateway.protocol.messages import Delta, FailureKind, RequestFailed


def delta(i: int) -> Delta:
    return Delta("r", 0, str(i), [i], 1, None)


def test_engine_failure_comes_after_the_output_before_it():
    async def main():
        rs = RequestStream(["r"], 1, None)
        rs.push(delta(1))
        rs.push(delta(2))
        rs.fail(RequestFailed("r", FailureKind.ENGINE_UNAVAILABLE, "gone"))
        assert [d.text for d in await rs.next()] == ["12"]  # merged: one delta per choice
        with pytest.raises(StreamFailed):
            await rs.next()

    asyncio.run(main())


def test_interrupt_ends_the_stream_at_once_even_while_output_keeps_coming():
    """A timeout must end a stream whose engine never pauses."""

    async def main():
        rs = RequestStream(["r"], 1, None)
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
        rs = RequestStream(["r"], 1, None)
        reader = asyncio.create_task(rs.next())
        await asyncio.sleep(0.01)
        rs.interrupt(ConnectionResetError())
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader, 5)

    asyncio.run(main())


def test_the_stream_knows_when_every_choice_has_ended():
    async def main():
        rs = RequestStream(["a", "b"], 2, None)
        for rid in ("a", "b"):
            for i in range(2):
                rs.push(Delta(rid, i, "x", [1], 1, None))
        assert not rs.finished
        for rid, i in (("a", 0), ("a", 1), ("b", 0)):
            rs.push(Delta(rid, i, "y", [2], 1, "stop"))
        assert not rs.finished
        rs.push(Delta("b", 1, "y", [2], 1, "length"))
        assert rs.finished
        batches = [batch async for batch in rs]  # the output before the end still comes out
        assert len(batches) == 1 and [(d.request_id, d.index, d.text) for d in batches[0]] == [
            ("a", 0, "xy"), ("a", 1, "xy"), ("b", 0, "xy"), ("b", 1, "xy")]
        assert await rs.next() is None

    asyncio.run(main())


def test_a_lagging_reader_gets_merged_deltas_unless_exact():
    async def main():
        for exact, expected in ((False, [("012", [0, 1, 2])]), (True, [("0", [0]), ("1", [1]), ("2", [2])])):
            rs = RequestStream(["r"], 1, None, exact=exact)
            for i in range(3):
                rs.push(delta(i))
            assert [(d.text, d.token_ids) for d in await rs.next()] == expected

    asyncio.run(main())


def test_a_direct_reader_takes_output_as_delivered_and_the_waiting_reader_the_rest():
    async def main():
        rs = RequestStream(["r"], 1, engine=None)
        taken: list = []

        def direct() -> bool:  # as an SSE stream's: only while its task waits, never the end
            if not rs.waiting or rs.finished:
                return False
            taken.append([d.text for d in rs.take()])
            return True

        rs.direct = direct
        reader = asyncio.ensure_future(rs.next())
        await asyncio.sleep(0)  # the reader now waits
        for text in ("a", "b"):
            rs.add(Delta("r", 0, text, [1], 1))
        rs.deliver()  # once per engine message: one take of both
        await asyncio.sleep(0)
        assert taken == [["ab"]] and not reader.done()
        rs.add(Delta("r", 0, "c", [2], 1, "stop"))
        rs.deliver()
        assert [d.text for d in await reader] == ["c"] and taken == [["ab"]]
        assert await rs.next() is None

    asyncio.run(main())
