"""The OpenAI-compatible HTTP server (Starlette on uvicorn, uvloop + httptools).

Every request is validated before it reaches an engine; a streaming response
starts only once the engine has accepted the request (its first output), so that
a prompt too long for the context still gets a plain 400 rather than a broken
stream. Errors are OpenAI error objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Callable, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vllm_gateway.gateway import VERSION, metrics
from vllm_gateway.gateway.anthropic import messages
from vllm_gateway.gateway.anthropic.errors import anthropic_error_response
from vllm_gateway.gateway.anthropic.schemas import decode_count_tokens_request, decode_messages_request
from vllm_gateway.gateway.openai.responses import serving as responses
from vllm_gateway.gateway.openai.responses.schemas import decode_responses_request
from vllm_gateway.gateway.openai.responses.store import ResponseStore
from vllm_gateway.gateway.openai import adapters, openapi
from vllm_gateway.gateway.openai.embeddings import embeddings
from vllm_gateway.gateway.openai.auth import ApiKeyAuth
from vllm_gateway.gateway.openai.calls import (
    Call,
    CallRun,
    ClientGone,
    detokenize,
    model_list,
    prepare_chat,
    prepare_completion,
    Target,
    ready_engine,
    target,
    tokenize,
)
from vllm_gateway.gateway.config import GatewaySettings
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.openai.errors import APIError, decode_or_400
from vllm_gateway.gateway.openai.schemas import (
    Health,
    Version,
    decode_chat_request,
    decode_completion_request,
    decode_detokenize_request,
    decode_embedding_request,
    decode_load_lora_request,
    decode_tokenize_request,
    decode_unload_lora_request,
    json_encode,
)

log = logging.getLogger("gateway.http")

JSON = "application/json"
T = TypeVar("T")


def json_response(obj: object, status: int = 200) -> Response:
    return Response(json_encode(obj), status_code=status, media_type=JSON)


def error_response(err: APIError) -> Response:
    metrics.ERRORS.labels(err.type).inc()
    return Response(err.body(), status_code=err.status, media_type=JSON)


ROUTES = tuple(op.path for op in openapi.OPERATIONS)
# Documented paths with a parameter, as patterns: metrics label a request by its route.
_TEMPLATES = [(re.compile("^" + re.sub(r"{\w+}", "[^/]+", p) + "$"), p) for p in ROUTES if "{" in p]


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    return next((template for pattern, template in _TEMPLATES if pattern.match(path)), "other")


class RequestMetrics:
    """ASGI middleware: requests by route and status, and requests in flight."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = route_label(path)
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


class Gateway:
    def __init__(self, settings: GatewaySettings, client: EngineClient | None = None) -> None:
        self.settings = settings
        self.client = client or EngineClient(settings.engine_endpoints, engine_timeout_s=settings.engine_timeout_s,
                                              routing=settings.routing)
        # Set on SIGTERM: new work gets a 503 while what runs finishes.
        self.draining = False
        self.responses_store = ResponseStore(settings.responses_store_size, settings.responses_store_ttl_s)

    # ------------------------------------------------------------------ helpers

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

    # ------------------------------------------------------------------- routes

    def _check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica",
                           type="service_unavailable_error", code="shutting_down")

    async def _decode(self, request: Request, decode: Callable[[bytes], T],
                      task: str | None = "generate") -> tuple[T, Target]:
        """The validated request body, and the served model it names (a ready
        engine serves it)."""
        self._check_open()
        req = decode_or_400(decode, await self._body(request))
        return req, target(self.client, getattr(req, "model", None), task)

    async def chat_completions(self, request: Request) -> Response:
        req, engine = await self._decode(request, decode_chat_request)
        return await self._run(request, prepare_chat(req, engine.model, self.settings.response_role))

    async def completions(self, request: Request) -> Response:
        req, engine = await self._decode(request, decode_completion_request)
        return await self._run(request, prepare_completion(req, engine.model, engine.max_model_len))

    async def models(self, request: Request) -> Response:
        self._check_open()
        return json_response(model_list(self.client))

    async def responses(self, request: Request) -> Response:
        req, engine = await self._decode(request, decode_responses_request)
        prepared = responses.prepare(req, engine.model, self.responses_store)
        if req.background:
            return json_response(responses.start_background(
                self.client, prepared, self.responses_store, self.settings.request_timeout_s))
        return await self._run(request, prepared.call)

    async def response_get(self, request: Request) -> Response:
        return json_response(responses.fetch(self.responses_store, request.path_params["response_id"]))

    async def response_delete(self, request: Request) -> Response:
        return json_response(responses.delete(self.responses_store, request.path_params["response_id"]))

    async def response_cancel(self, request: Request) -> Response:
        return json_response(await responses.cancel(self.responses_store, request.path_params["response_id"]))

    async def messages(self, request: Request) -> Response:
        """Anthropic's Messages API: its own error shape, from the first check on."""
        try:
            req, engine = await self._decode(request, decode_messages_request)
            return await self._run(request, messages.prepare(req, engine.model))
        except APIError as e:
            return anthropic_error_response(e)

    async def count_tokens(self, request: Request) -> Response:
        try:
            req, engine = await self._decode(request, decode_count_tokens_request)
            return json_response(await messages.count_tokens(self.client, req, engine))
        except APIError as e:
            return anthropic_error_response(e)

    async def embeddings(self, request: Request) -> Response:
        req, engine = await self._decode(request, decode_embedding_request, task="embed")
        return json_response(await self._until_disconnect(request, embeddings(self.client, req, engine)))

    async def load_lora(self, request: Request) -> Response:
        self._check_open()
        req = decode_or_400(decode_load_lora_request, await self._body(request))
        text = await adapters.load(self.client, req, self.settings.allow_runtime_lora)
        return Response(text, media_type="text/plain")

    async def unload_lora(self, request: Request) -> Response:
        self._check_open()
        req = decode_or_400(decode_unload_lora_request, await self._body(request))
        text = await adapters.unload(self.client, req, self.settings.allow_runtime_lora)
        return Response(text, media_type="text/plain")

    async def tokenize(self, request: Request) -> Response:
        req, engine = await self._decode(request, decode_tokenize_request, task=None)
        return json_response(await self._until_disconnect(request, tokenize(self.client, req, engine)))

    async def detokenize(self, request: Request) -> Response:
        req, engine = await self._decode(request, decode_detokenize_request, task=None)
        return json_response(await self._until_disconnect(request, detokenize(self.client, req, engine)))

    async def version(self, request: Request) -> Response:
        return json_response(Version(ready_engine(self.client).vllm_version, VERSION))

    async def ping(self, request: Request) -> Response:
        """200 while an engine is ready and the server is not draining (vLLM's
        /ping, for load balancers and SageMaker); 503 otherwise."""
        ok = self.client.ready and not self.draining
        return Response(b"{}", status_code=200 if ok else 503, media_type=JSON)

    async def health(self, request: Request) -> Response:
        """200 while at least one engine is ready and the server is not draining;
        the body lists every engine's state and load."""
        engines = self.client.describe()
        if self.draining:
            return json_response(Health("draining", engines), 503)
        if self.client.ready:
            return json_response(Health("ok", engines))
        return json_response(Health("unavailable", engines), 503)

    # ------------------------------------------------------------------ running

    async def _run(self, request: Request, call: Call) -> Response | SSEResponse:
        run = CallRun(self.client, call, self.settings.request_timeout_s, self.settings.stream_interval_ms / 1000)
        await self._until_disconnect(request, run.start())
        if not call.stream:
            # One disconnect watcher for the whole answer, not one per engine step.
            return json_response(await self._until_disconnect(request, run.collect()))
        return SSEResponse(run)

    async def _until_disconnect(self, request: Request, awaitable):
        """Await `awaitable`, but give up (and let the caller abort the engine
        request) if the client disconnects meanwhile."""
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work in done:
            return work.result()
        work.cancel()
        raise ClientGone()


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
        gone = asyncio.ensure_future(_disconnected(receive))
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


async def _disconnected(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------- the app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(APIError(exc.status_code, str(exc.detail)))


async def _metrics(request: Request) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(APIError(500, f"internal gateway error: {type(exc).__name__}"))


def build_app(settings: GatewaySettings, client: EngineClient | None = None) -> Starlette:
    gw = Gateway(settings, client)
    spec = json_encode(openapi.document(VERSION))

    async def openapi_json(request: Request) -> Response:
        return Response(spec, media_type=JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gw.client.start()
        yield
        await gw.client.close()

    # The routes are the documented operations: a handler without an operation (or the
    # reverse) fails here, at start-up, instead of serving an undocumented route.
    handlers = {
        ("post", "/v1/chat/completions"): gw.chat_completions,
        ("post", "/v1/completions"): gw.completions,
        ("post", "/v1/responses"): gw.responses,
        ("get", "/v1/responses/{response_id}"): gw.response_get,
        ("delete", "/v1/responses/{response_id}"): gw.response_delete,
        ("post", "/v1/responses/{response_id}/cancel"): gw.response_cancel,
        ("post", "/v1/messages"): gw.messages,
        ("post", "/v1/messages/count_tokens"): gw.count_tokens,
        ("get", "/v1/models"): gw.models,
        ("post", "/v1/embeddings"): gw.embeddings,
        ("post", "/v1/load_lora_adapter"): gw.load_lora,
        ("post", "/v1/unload_lora_adapter"): gw.unload_lora,
        ("post", "/tokenize"): gw.tokenize,
        ("post", "/detokenize"): gw.detokenize,
        ("get", "/version"): gw.version,
        ("get", "/ping"): gw.ping,
        ("post", "/ping"): gw.ping,
        ("get", "/health"): gw.health,
        ("get", "/metrics"): _metrics,
        ("get", "/openapi.json"): openapi_json,
    }
    documented = {(op.method, op.path) for op in openapi.OPERATIONS}
    if set(handlers) != documented:
        raise RuntimeError(f"routes and documented operations differ: {set(handlers) ^ documented}")
    app = GatewayApp(
        routes=[Route(op.path, handlers[(op.method, op.path)], methods=[op.method.upper()])
                for op in openapi.OPERATIONS],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            ClientGone: _client_gone,
            Exception: _unexpected,
        },
        lifespan=lifespan,
        middleware=[Middleware(RequestMetrics),
                    Middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=settings.open_paths)],
    )
    app.state.gateway = gw
    metrics.watch_engines(lambda: gw.client)
    return app


class GatewayApp(Starlette):
    """Starlette, keeping the ASGI server's own `send` in the scope for streams
    (see `SSEResponse`)."""

    async def __call__(self, scope, receive, send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM / SIGINT drains: new requests get a
    503 (and /health too, so balancers move on), running ones may finish for up to
    `drain_timeout_s`, then the server stops and the process exits 0. A second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, grace_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.gateway.draining or self._loop is None:
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.gateway.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        client = self.gateway.client
        log.info("draining: %d request(s) in flight, up to %.0f s", client.in_flight, self.grace_s)
        deadline = time.monotonic() + self.grace_s
        while client.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if client.in_flight:
            log.warning("drain time over; %d request(s) still running are cut off", client.in_flight)
        else:
            log.info("drained")
        self.should_exit = True


def serve(settings: GatewaySettings) -> None:
    app = build_app(settings)
    log.info("HTTP gateway on http://%s:%d, engines %s", settings.host, settings.port, ", ".join(settings.engine_endpoints))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False, timeout_graceful_shutdown=5,
    )
    DrainingServer(config, app.state.gateway, settings.drain_timeout_s).run()
