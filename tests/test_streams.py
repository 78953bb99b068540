"""Units: a request's stream of engine output, and the ZeroMQ channel both ends of
the gateway-engine link read their socket with (real sockets, no engine)."""

import asyncio

import pytest
import zmq

from gateway.engine_client import RequestStream, StreamFailed
from protocol.channel import Channel, unbounded
from protocol.messages import Delta, RequestFailed


def delta(i: int) -> Delta:
    return Delta("r", 0, str(i), [i], 1, None)


def test_engine_failure_comes_after_the_output_before_it():
    async def main():
        rs = RequestStream(["r"], None)
        rs.push(delta(1))
        rs.push(delta(2))
        rs.fail(RequestFailed("r", 503, "gone"))
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
        rs.fail(RequestFailed("r", 503, "gone"))  # the first error wins
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


def test_channel_delivers_everything_while_both_sides_send(tmp_path):
    """ZeroMQ's descriptor is edge-triggered and a send can swallow the edge: input
    that arrives while the channel is busy sending must still be read."""
    n = 3000
    ctx = zmq.Context()
    router = unbounded(ctx.socket(zmq.ROUTER))
    router.bind(f"ipc://{tmp_path}/c")
    dealer = unbounded(ctx.socket(zmq.DEALER))
    dealer.connect(f"ipc://{tmp_path}/c")
    dealer.send(b"before start")  # queued before the reader exists

    async def main():
        got_router: list[bytes] = []
        got_dealer: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        def on_router(frames):
            ident, payload = frames
            got_router.append(payload)
            if payload.startswith(b"d"):
                server.send((ident, b"r" + payload[1:]))  # answer from inside the handler

        def on_dealer(frames):
            got_dealer.append(frames[0])
            if len(got_dealer) == n and not done.done():
                done.set_result(None)

        server = Channel(router, on_router)
        client = Channel(dealer, on_dealer)
        server.start()
        client.start()
        for i in range(n):
            client.send((b"d%d" % i,))
            if i % 500 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(done, 20)
        assert got_router[0] == b"before start"
        assert got_router[1:] == [b"d%d" % i for i in range(n)]
        assert got_dealer == [b"r%d" % i for i in range(n)]
        client.close()
        server.close()

    try:
        asyncio.run(main())
    finally:
        ctx.destroy(0)


def test_channel_survives_a_handler_error(tmp_path):
    ctx = zmq.Context()
    router = unbounded(ctx.socket(zmq.ROUTER))
    router.bind(f"ipc://{tmp_path}/e")
    dealer = unbounded(ctx.socket(zmq.DEALER))
    dealer.connect(f"ipc://{tmp_path}/e")

    async def main():
        got = []
        done = asyncio.get_running_loop().create_future()

        def on_router(frames):
            if frames[1] == b"bad":
                raise ValueError("a bug in a handler")
            got.append(frames[1])
            if frames[1] == b"last":
                done.set_result(None)

        server = Channel(router, on_router)
        server.start()
        for payload in (b"one", b"bad", b"last"):
            dealer.send(payload)
        await asyncio.wait_for(done, 10)
        assert got == [b"one", b"last"]
        server.close()

    try:
        asyncio.run(main())
    finally:
        ctx.destroy(0)
