"""A streamed answer as server-sent events, written straight to the ASGI
server's `send`, and the watch for a client that goes away."""

from __future__ import annotations

import asyncio

from vllm_gateway.gateway import metrics
from vllm_gateway.gateway.core.calls import CallRun, ClientGone
from vllm_gateway.gateway.core.errors import APIError

# The ASGI server's own `send`, for the body of a stream (see `SSEResponse`).
SERVER_SEND = "vllm_gateway.server_send"

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
)


class SSEResponse:
    """A streamed answer as server-sent events, one write per engine output batch.

    Every streamed token passes through here, so the stream is written by a task
    of its own (`_write`): a wake-up per batch resumes a few frames, not the
    dozen of the ASGI app's middleware stack, and its writes go to the server's
    own `send` (`GatewayApp`), past the middlewares' send wrappers, which only
    look at the response's start. The app's coroutine waits for the stream's
    end, and a second task for the client's disconnect (which ends the stream
    and frees the engine slots at once)."""

    def __init__(self, run: CallRun) -> None:
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        run = self.run
        gone = asyncio.ensure_future(disconnected(receive))
        gone.add_done_callback(lambda t: t.cancelled() or run.client_gone())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
            await asyncio.ensure_future(self._write(scope.get(SERVER_SEND, send)))
        finally:
            gone.cancel()
            run.close()  # done, failed or client gone: the engine slots are freed now

    async def _write(self, send) -> None:
        run = self.run
        wire = run.call.wire
        event = wire.event
        next_batch = run.next_batch
        batches = metrics.HTTP_BATCHES
        try:
            while (chunks := await next_batch()) is not None:
                if chunks:
                    batches.value += 1
                    await send({"type": "http.response.body", "body": b"".join([event(c) for c in chunks]),
                                "more_body": True})
            tail = wire.done
        except ClientGone:
            return
        except APIError as e:
            metrics.ERRORS.labels(e.type).inc()
            tail = wire.error(e) + wire.done
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def disconnected(receive) -> None:
    """Returns when the client has gone away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
