"""A streamed answer as server-sent events, written straight to the ASGI
server's `send`, and the watch for a client that goes away."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from vllm_gateway.gateway import metrics
from vllm_gateway.gateway.core.calls import CallRun, ClientGone
from vllm_gateway.gateway.core.errors import APIError

# The ASGI server's own `send`, for the body of a stream (see `SSEResponse`).
SERVER_SEND = "vllm_gateway.server_send"

log = logging.getLogger("gateway.http")

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
)


class SSEResponse:
    """A streamed answer as server-sent events, one write per engine output batch.

    Every streamed token passes through here. While the socket takes writes, a
    batch is written where it arrives, in the engine client's receive path
    (`_direct`, the stream's `direct` reader): no task wakes for it. Otherwise
    (the first batch, the last, a socket whose client reads slowly, a server
    other than uvicorn's httptools one) the stream's own task (`_write`) writes
    it to the server's own `send` (`GatewayApp`), past the middlewares' send
    wrappers, which only look at the response's start; a write waiting on a full
    socket is what `StreamWatch` times. The app's coroutine waits for the
    stream's end, and a second task for the client's disconnect (which ends the
    stream and frees the engine slots at once)."""

    __slots__ = ("run", "watch", "on_close", "blocked_since", "writer", "_socket", "_chunks", "_event")

    def __init__(self, run: CallRun, watch: "StreamWatch | None" = None) -> None:
        self.run = run
        self.watch = watch
        self.on_close = None  # called once the stream is over (its admission place is freed)
        self.blocked_since: float | None = None  # a write waiting for the client to read, since
        self.writer: asyncio.Task | None = None
        self._socket: Any = None  # uvicorn's response cycle, written to directly
        self._chunks = run.call.fmt.chunks
        self._event = run.call.wire.event

    async def __call__(self, scope, receive, send) -> None:
        run = self.run
        gone = asyncio.ensure_future(disconnected(receive))
        gone.add_done_callback(lambda t: t.cancelled() or run.client_gone())
        server_send = scope.get(SERVER_SEND, send)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
            self.writer = asyncio.ensure_future(self._write(server_send))
            if self.watch is not None:
                self.watch.streams.add(self)
            if not run.stream_interval_s:  # batching waits on a timer: its task writes
                self._socket = direct_socket(server_send)
                if self._socket is not None:
                    run.rs.direct = self._direct
            await asyncio.wait([self.writer])
            # Cancelled by the watch (a client that stopped reading): the response
            # ends incomplete and the server closes the connection.
        finally:
            run.rs.direct = None
            if self.watch is not None:
                self.watch.streams.discard(self)
            gone.cancel()
            run.close()  # done, failed or client gone: the engine slots are freed now
            if self.on_close is not None:
                self.on_close()

    async def _write(self, send) -> None:
        run = self.run
        wire = run.call.wire
        event = wire.event
        next_batch = run.next_batch
        batches = metrics.HTTP_BATCHES
        clock = time.monotonic
        try:
            while (chunks := await next_batch()) is not None:
                if chunks:
                    batches.value += 1
                    self.blocked_since = clock()
                    await send({"type": "http.response.body", "body": b"".join([event(c) for c in chunks]),
                                "more_body": True})
                    self.blocked_since = None
            tail = wire.done
        except ClientGone:
            return
        except APIError as e:
            metrics.ERRORS.labels(e.type).inc()
            tail = wire.error(e) + wire.done
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _direct(self) -> bool:
        """Write the output that arrived, now, if the stream's task waits for it
        (it wrote the first batch), the output does not end the stream (the
        task writes the end), and the socket takes it (what does not fit waits
        for the task, and counts as unsent for `StreamWatch`)."""
        rs = self.run.rs
        sock = self._socket
        if not rs.waiting or rs.finished or rs.error is not None or sock.flow.write_paused or sock.disconnected:
            return False
        batch = rs.take()
        try:
            chunks = self._chunks(batch)
            if chunks:
                event = self._event
                body = b"".join([event(c) for c in chunks])
                sock.transport.write(b"%x\r\n%b\r\n" % (len(body), body))  # one chunk of the chunked body
                metrics.HTTP_BATCHES.value += 1
                metrics.HTTP_BATCHES_ON_ARRIVAL.value += 1
        except Exception as e:  # noqa: BLE001 - ends the stream as the task would have
            rs.interrupt(e)
        return True


def direct_socket(send) -> Any:
    """uvicorn's response cycle behind its `send`, when a streamed body can be
    written to its transport directly, as uvicorn's httptools protocol writes a
    body part of a chunked response (read in uvicorn 0.54). None for any other
    server, or a uvicorn whose cycle lacks these attributes: then every write
    goes through `send`."""
    cycle = getattr(send, "__self__", None)
    if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
        return None
    if not all(hasattr(cycle, a) for a in ("transport", "flow", "disconnected", "chunked_encoding")):
        return None
    if cycle.chunked_encoding is not True or getattr(cycle, "response_complete", True):
        return None
    return cycle


class StreamWatch:
    """Ends streams whose client stopped reading: a write blocked for longer than
    STREAM_WRITE_TIMEOUT_S, or output piling up unsent beyond STREAM_MAX_UNSENT
    engine outputs while a write is blocked. Such a stream is cut (the
    connection closes), its engine request aborted and its place freed. One
    check a second over all streams, not a timer per write."""

    INTERVAL_S = 0.5

    def __init__(self, write_timeout_s: float, max_unsent: int) -> None:
        self.write_timeout_s = write_timeout_s
        self.max_unsent = max_unsent
        self.streams: set[SSEResponse] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None and (self.write_timeout_s > 0 or self.max_unsent > 0):
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL_S)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        for s in list(self.streams):
            since = s.blocked_since
            if since is None or s.writer is None:
                continue
            unsent = s.run.rs.unsent
            if 0 < self.write_timeout_s < now - since:
                why = f"the client read nothing for {now - since:.0f} s (STREAM_WRITE_TIMEOUT_S)"
            elif 0 < self.max_unsent < unsent:
                why = f"{unsent} engine outputs waited unsent for the client (STREAM_MAX_UNSENT)"
            else:
                continue
            log.warning("ending a stream: %s", why)
            metrics.ERRORS.labels("client_too_slow").inc()
            self.streams.discard(s)
            s.writer.cancel()


async def disconnected(receive) -> None:
    """Returns when the client has gone away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
