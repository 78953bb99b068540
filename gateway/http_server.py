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
import time
import uuid
from collections.abc import AsyncIterator
from typing import Callable, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway import requests as oai_requests
from gateway.config import GatewaySettings
from gateway.engine_client import EngineClient, NoEngine, RequestStream, StreamFailed
from gateway.errors import APIError, from_validation
from gateway.responses import SSE_DONE, ChatFormatter, CompletionFormatter, sse
from protocol.messages import Generate, RequestFailed
from protocol.openai import (
    ModelCard,
    ModelList,
    decode_chat_request,
    decode_completion_request,
    json_encode,
)

log = logging.getLogger("gateway.http")

JSON = "application/json"
T = TypeVar("T")


def json_response(obj: object, status: int = 200) -> Response:
    return Response(json_encode(obj), status_code=status, media_type=JSON)


def error_response(err: APIError) -> Response:
    return Response(err.body(), status_code=err.status, media_type=JSON)


def engine_error(failure: RequestFailed, prompt_param: str) -> APIError:
    param = prompt_param if failure.param == "prompt" else failure.param
    code = "context_length_exceeded" if "maximum context length" in failure.message else None
    return APIError(failure.status, failure.message, param=param, code=code, type=failure.error_type if failure.status >= 500 else None)


class Gateway:
    def __init__(self, settings: GatewaySettings, client: EngineClient | None = None) -> None:
        self.settings = settings
        self.client = client or EngineClient(settings.engine_endpoints)

    # ------------------------------------------------------------------ helpers

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body too large ({declared} bytes; the limit is {limit})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body too large (over {limit} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _served_model(self) -> str:
        status = self.client.ready_status()
        if status is None:
            raise APIError(503, "no engine is ready yet; retry shortly", type="service_unavailable_error")
        return status.model

    def _submit(self, gens: list[Generate]) -> RequestStream:
        try:
            return self.client.submit(gens)
        except NoEngine:
            raise APIError(503, "no engine is ready; retry shortly", type="service_unavailable_error") from None

    # ------------------------------------------------------------------- routes

    async def _parse(self, request: Request, decode: Callable[[bytes], T]) -> tuple[T, str]:
        """The validated request body, and the model name being served."""
        body = await self._body(request)
        try:
            req = decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise from_validation(e) from None
        model = self._served_model()
        oai_requests.check_model(req.model, model)  # type: ignore[attr-defined]
        return req, model

    async def chat_completions(self, request: Request) -> Response:
        req, model = await self._parse(request, decode_chat_request)
        gen = oai_requests.chat_generate(req, f"chatcmpl-{uuid.uuid4().hex}")
        opts = req.stream_options
        fmt = ChatFormatter(
            gen.request_id, req.n, model, self.settings.response_role,
            continuous_usage=bool(opts and opts.continuous_usage_stats),
        )
        return await self._run(request, [gen], fmt, "messages", req.stream, bool(opts and opts.include_usage), fmt.role_chunk)

    async def completions(self, request: Request) -> Response:
        req, model = await self._parse(request, decode_completion_request)
        gens = oai_requests.completion_generates(req, f"cmpl-{uuid.uuid4().hex}")
        opts = req.stream_options
        fmt = CompletionFormatter(
            [g.request_id for g in gens], req.n, model, echo=req.echo,
            continuous_usage=bool(opts and opts.continuous_usage_stats),
        )
        return await self._run(request, gens, fmt, "prompt", req.stream, bool(opts and opts.include_usage), None)

    async def models(self, request: Request) -> Response:
        status = self.client.ready_status()
        if status is None:
            raise APIError(503, "no engine is ready yet; retry shortly", type="service_unavailable_error")
        return json_response(ModelList([ModelCard(status.model, int(time.time()), max_model_len=status.max_model_len)]))

    async def health(self, request: Request) -> Response:
        if self.client.ready:
            return json_response({"status": "ok"})
        return json_response({"status": "unavailable"}, 503)

    # ------------------------------------------------------------------ running

    async def _run(
        self,
        request: Request,
        gens: list[Generate],
        fmt: ChatFormatter | CompletionFormatter,
        prompt_param: str,
        stream: bool,
        include_usage: bool,
        opening: Callable[[], object] | None,
    ) -> Response:
        rs = self._submit(gens)
        try:
            first = await self._until_disconnect(request, rs.next())
        except BaseException as e:
            self.client.release(rs, abort=True)
            if isinstance(e, StreamFailed):
                raise engine_error(e.failure, prompt_param) from None
            raise
        if not stream:
            return await self._collect(request, rs, fmt, first, prompt_param)
        return StreamingResponse(
            self._sse(rs, fmt, first, prompt_param, include_usage, opening), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _collect(self, request: Request, rs: RequestStream, fmt, first, prompt_param: str) -> Response:
        async def rest() -> None:
            fmt.add(first)
            while not fmt.book.done:
                fmt.add(await rs.next())

        try:
            # One disconnect watcher for the whole answer, not one per engine step.
            await self._until_disconnect(request, rest())
        except StreamFailed as e:
            raise engine_error(e.failure, prompt_param) from None
        finally:
            self.client.release(rs, abort=not fmt.book.done)
        return json_response(fmt.response())

    async def _sse(self, rs: RequestStream, fmt, first, prompt_param: str, include_usage: bool, opening) -> AsyncIterator[bytes]:
        try:
            parts = [sse(opening())] if opening is not None else []
            parts += [sse(c) for c in fmt.chunks(first)]
            yield b"".join(parts)
            while not fmt.book.done:
                deltas = await rs.next()
                yield b"".join([sse(c) for c in fmt.chunks(deltas)])
            tail = sse(fmt.usage_chunk()) if include_usage else b""
            yield tail + SSE_DONE
        except StreamFailed as e:
            yield engine_error(e.failure, prompt_param).sse_event() + SSE_DONE
        finally:
            # Client gone, or done: either way the engine slots are freed now.
            self.client.release(rs, abort=not fmt.book.done)

    async def _until_disconnect(self, request: Request, awaitable):
        """Await `awaitable`, but give up (and let the caller abort the engine
        request) if the client disconnects meanwhile."""
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work in done:
            return work.result()
        work.cancel()
        raise ClientGone()


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------- the app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(APIError(exc.status_code, str(exc.detail)))


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(APIError(500, f"internal gateway error: {type(exc).__name__}"))


def build_app(settings: GatewaySettings, client: EngineClient | None = None) -> Starlette:
    gw = Gateway(settings, client)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gw.client.start()
        yield
        await gw.client.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
            Route("/v1/completions", gw.completions, methods=["POST"]),
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/health", gw.health, methods=["GET"]),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            ClientGone: _client_gone,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app


def serve(settings: GatewaySettings) -> None:
    import uvicorn

    app = build_app(settings)
    log.info("HTTP gateway on http://%s:%d, engines %s", settings.host, settings.port, ", ".join(settings.engine_endpoints))
    uvicorn.run(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False, timeout_graceful_shutdown=settings.drain_timeout_s,
    )
