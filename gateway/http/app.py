"""The ASGI app (Starlette on uvicorn), built from the table of operations.

Every route is an operation of the table (core/operations.py); one endpoint
serves them all: it reads and decodes the body, calls the operation's handler,
and answers with what it returns (a `Call` is run, as server-sent events when it
streams). A streaming response starts only once the engine has accepted the
request (its first output), so that a prompt too long for the context still
gets a plain 400 rather than a broken stream. Errors take the operation's
shape: OpenAI's error object, or Anthropic's on its routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from vllm_gateway.gateway import metrics
from vllm_gateway.gateway.config import GatewaySettings
from vllm_gateway.gateway.core.admission import Admission
from vllm_gateway.gateway.core.calls import Call, CallRun, ClientGone, EventStream
from vllm_gateway.gateway.core.errors import APIError, decode_or_400
from vllm_gateway.gateway.core.operations import JSON, Context, Incoming, Operation, Operations, Result
from vllm_gateway.gateway.core.schema import json_decoder, json_encode
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.http.auth import KEY_ID, ApiKeyAuth
from vllm_gateway.gateway.http.sse import SERVER_SEND, SSEResponse, StreamWatch, disconnected

log = logging.getLogger("gateway.http")


def json_response(obj: object, status: int = 200) -> Response:
    return Response(json_encode(obj), status_code=status, media_type=JSON)


def error_response(err: APIError, operation: Operation | None = None) -> Response:
    metrics.ERRORS.labels(err.type).inc()
    body = operation.errors_as.body(err) if operation is not None else err.body()
    return Response(body, status_code=err.status, media_type=JSON, headers=err.headers)


def overloaded(cap: int) -> APIError:
    return APIError(429, f"this server is at its limit of {cap} requests in flight (MAX_CONCURRENT_REQUESTS); "
                         "retry shortly or on another replica", type="rate_limit_error", code="overloaded",
                    headers={"Retry-After": "1"})


class RequestMetrics:
    """ASGI middleware: requests by route and status, and requests in flight."""

    def __init__(self, app, operations: Operations) -> None:
        self.app = app
        self.operations = operations

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.operations.route_label(scope["path"])
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(route, str(status)).inc()


class Endpoints:
    """Serves the operations over HTTP."""

    def __init__(self, settings: GatewaySettings, ctx: Context) -> None:
        self.settings = settings
        self.ctx = ctx
        self.watch = StreamWatch(settings.stream_write_timeout_s, settings.stream_max_unsent)

    def endpoint(self, op: Operation):
        decode = json_decoder(op.body) if op.body is not None else None
        admission = self.ctx.admission

        async def serve(request: Request) -> Response | SSEResponse:
            admitted = False
            try:
                if op.work:
                    if self.ctx.draining:
                        raise APIError(503, "the server is shutting down; retry on another replica",
                                       type="service_unavailable_error", code="shutting_down",
                                       headers={"Retry-After": "1"})
                    if not admission.try_enter():
                        raise overloaded(admission.cap)
                    admitted = True
                body = decode_or_400(decode, await self._body(request)) if decode is not None else None
                incoming = Incoming(body, request.path_params, request.scope.get(KEY_ID), dict(request.query_params))
                out = await self._until_disconnect(request, op.handler(self.ctx, incoming))
                if isinstance(out, EventStream):
                    return StreamingResponse(_sse(out), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                if isinstance(out, Call):
                    answer = await self._run(request, out)
                    if isinstance(answer, SSEResponse) and admitted:
                        answer.on_close = admission.leave  # the stream holds the place until it ends
                        admitted = False
                    return answer
                if isinstance(out, Result):
                    content = out.body if isinstance(out.body, (bytes, str)) else json_encode(out.body)
                    return Response(content, status_code=out.status, media_type=out.media_type)
                return json_response(out)
            except APIError as e:
                return error_response(e, op)
            finally:
                if admitted:
                    admission.leave()

        return serve

    async def _body(self, request: Request) -> bytes:
        """The whole JSON body: at most `max_body_bytes`, arriving within
        `body_timeout_s` (a client that stops sending mid-body gets a 408 instead
        of holding a connection and its buffer for ever)."""
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != JSON:
            raise APIError(415, f"Content-Type must be {JSON}, not {media_type or 'missing'}",
                           param="Content-Type")
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body too large ({declared} bytes; the limit is {limit})")
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body too large (over {limit} bytes)")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.settings.body_timeout_s:g} s "
                                f"({size} bytes received)", code="request_timeout") from None
        return b"".join(chunks)

    async def _run(self, request: Request, call: Call) -> Response | SSEResponse:
        s = self.settings
        run = CallRun(self.ctx.client, call, s.request_timeout_s, s.stream_interval_ms / 1000)
        await self._until_disconnect(request, run.start())
        if not call.stream:
            # One disconnect watcher for the whole answer, not one per engine step.
            return json_response(await self._until_disconnect(request, run.collect()))
        return SSEResponse(run, self.watch)

    @staticmethod
    async def _until_disconnect(request: Request, awaitable) -> Any:
        """Await `awaitable`, but give up (and let the caller abort the engine
        request) if the client disconnects meanwhile."""
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work in done:
            return work.result()
        work.cancel()
        raise ClientGone()


async def _sse(stream: EventStream):
    """An `EventStream` as server-sent events (a replay: not the path every
    generated token takes, which is `SSEResponse`)."""
    wire = stream.wire
    try:
        async for batch in stream.batches:
            yield b"".join(wire.event(e) for e in batch)
        yield wire.done
    except APIError as e:
        metrics.ERRORS.labels(e.type).inc()
        yield wire.error(e) + wire.done


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    ctx: Context = request.app.state.ctx
    return error_response(APIError(exc.status_code, str(exc.detail)),
                          next((op for op, _ in ctx.operations.at(request.url.path)), None))


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(APIError(500, f"internal gateway error: {type(exc).__name__}"))


def build_app(settings: GatewaySettings, operations: Operations, client: EngineClient | None = None) -> Starlette:
    client = client or EngineClient(settings.engine_endpoints, engine_timeout_s=settings.engine_timeout_s,
                                    router=settings.routing.router())
    ctx = Context(client, settings, operations, admission=Admission(settings.max_concurrent_requests))
    endpoints = Endpoints(settings, ctx)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await client.start()
        endpoints.watch.start()
        yield
        endpoints.watch.stop()
        await ctx.close()

    app = GatewayApp(
        routes=[Route(op.path, endpoints.endpoint(op), methods=[op.method.upper()]) for op in operations],
        exception_handlers={HTTPException: _http_error, ClientGone: _client_gone, Exception: _unexpected},
        lifespan=lifespan,
        middleware=[Middleware(RequestMetrics, operations=operations),
                    Middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=settings.open_paths,
                               errors_for=operations.errors_for)],
    )
    app.state.ctx = ctx
    metrics.watch_engines(lambda: ctx.client)
    return app


class GatewayApp(Starlette):
    """Starlette, keeping the ASGI server's own `send` in the scope for streams
    (see `SSEResponse`)."""

    async def __call__(self, scope, receive, send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)
