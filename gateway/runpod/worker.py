"""The RunPod serverless worker: RunPod's job queue as an intake of the gateway.

`vllm-gateway runpod` starts the engine process(es), waits until they are ready,
then runs `runpod.serverless.start` in this process with `JobHandler.handle`, an
async generator, as the handler. Jobs take the input shapes of RunPod's
worker-vllm (`protocol/runpod.py`): OpenAI mode (`openai_route` + `openai_input`)
and standard mode (`prompt` / `messages` + `sampling_params`). Streamed output is
batched: batch sizes grow min, min*g, min*g^2, ... up to max.

A job that fails yields `{"error": <the OpenAI error object as a JSON string>}`,
which the SDK turns into a FAILED job; the worker goes on with the next jobs. A
job RunPod cancels has its engine request aborted at once, and the
`CancelledError` goes on up to the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from vllm_gateway.gateway import VERSION, metrics
from vllm_gateway.gateway.anthropic import messages
from vllm_gateway.gateway.anthropic.errors import body as anthropic_error_body
from vllm_gateway.gateway.anthropic.schemas import count_tokens_request_from_dict, messages_request_from_dict
from vllm_gateway.gateway.openai.calls import (
    Call,
    CallRun,
    detokenize,
    model_list,
    prepare_chat,
    prepare_completion,
    ready_engine,
    target,
    tokenize,
)
from vllm_gateway.gateway.config import RunPodSettings
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.openai.errors import APIError, decode_or_400
from vllm_gateway.gateway.runpod.standard import JobFormatter, job_generate
from vllm_gateway.gateway.openai.embeddings import embeddings
from vllm_gateway.gateway.openai.responses import serving as responses
from vllm_gateway.gateway.openai.responses.schemas import responses_request_from_dict
from vllm_gateway.gateway.openai.responses.store import ResponseStore
from vllm_gateway.gateway.openai.schemas import (
    Health,
    Version,
    chat_request_from_dict,
    completion_request_from_dict,
    detokenize_request_from_dict,
    embedding_request_from_dict,
    json_encode,
    tokenize_request_from_dict,
)
from vllm_gateway.gateway.runpod.schemas import OPENAI_ROUTES, JobInput, job_input_from_dict, to_builtins

log = logging.getLogger("gateway.runpod")



class BatchSizer:
    """Stream batch sizes: min, min*g, min*g^2, ... capped at max (worker-vllm's
    rule: with g <= 1 or min >= max, every batch has the max size)."""

    def __init__(self, max_size: int, min_size: int, growth: float) -> None:
        self.max = max_size
        self.growth = growth
        dynamic = growth > 1 and max_size > min_size
        self._size = float(min_size if dynamic else max_size)

    @property
    def size(self) -> int:
        return max(1, math.ceil(self._size - 1e-9))

    def grow(self) -> None:
        self._size = min(self._size * self.growth, float(self.max))


JOB_ROUTES = {("POST", p) for p in OPENAI_ROUTES if p != "/v1/models"} | {("GET", "/v1/models")}


class JobError(Exception):
    """A failed job whose error body is in its API's shape (Anthropic's)."""

    def __init__(self, body: str, error: APIError) -> None:
        super().__init__(error.message)
        self.body = body
        self.error = error


class JobHandler:
    def __init__(self, settings: RunPodSettings) -> None:
        self.settings = settings
        self._client: EngineClient | None = None
        self.responses_store = ResponseStore(settings.responses_store_size, settings.responses_store_ttl_s)

    async def _stored_response(self, method: str, path: str) -> Any:
        """GET / DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel."""
        parts = path.split("/")  # "", "v1", "responses", id[, "cancel"]
        if len(parts) == 4 and method == "GET":
            return responses.fetch(self.responses_store, parts[3])
        if len(parts) == 4 and method == "DELETE":
            return responses.delete(self.responses_store, parts[3])
        if len(parts) == 5 and parts[4] == "cancel" and method == "POST":
            return await responses.cancel(self.responses_store, parts[3])
        raise APIError(404, f"no route {method} {path}", param="route", code="unknown_route")

    def concurrency(self, current: int) -> int:
        return self.settings.max_concurrency

    async def _engines(self) -> EngineClient:
        # Made on the first job, in the event loop the SDK runs jobs in.
        if self._client is None:
            self._client = EngineClient(self.settings.engine_endpoints, engine_timeout_s=self.settings.engine_timeout_s,
                                        routing=self.settings.routing)
            await self._client.start()
        if not self._client.ready:
            await self._client.wait_ready(self.settings.engine_wait_s)
        return self._client

    def _sizer(self, job: JobInput) -> BatchSizer:
        s = self.settings
        return BatchSizer(
            job.max_batch_size or s.max_batch_size,
            job.min_batch_size or s.min_batch_size,
            job.batch_size_growth_factor or s.batch_size_growth_factor,
        )

    # ------------------------------------------------------------------- handler

    async def handle(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        """The RunPod handler: yields stream batches, or one whole answer."""
        raw = job.get("input")
        route = (raw.get("openai_route") or raw.get("route") or "standard") if isinstance(raw, dict) else "standard"
        status = "200"
        metrics.IN_FLIGHT.inc()
        try:
            outputs = self._outputs(_parse(raw))
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    metrics.RUNPOD_BATCHES.inc()
                    yield out
        except JobError as e:  # an error in the shape of the route's API
            status = str(e.error.status)
            metrics.ERRORS.labels(e.error.type).inc()
            log.info("job %s failed: %s %s", job.get("id"), e.error.status, e.error.message)
            yield {"error": e.body}
        except APIError as e:
            status = str(e.status)
            metrics.ERRORS.labels(e.type).inc()
            log.info("job %s failed: %s %s", job.get("id"), e.status, e.message)
            yield {"error": e.body().decode()}
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(route if route in OPENAI_ROUTES or route == "standard" else "other", status).inc()

    def _outputs(self, job: JobInput) -> AsyncIterator[Any]:
        if job.route is not None:
            return self._route(job.method.upper(), job.route, job.body or {}, job)
        if job.openai_route is None and job.input is not None and job.prompt is None and job.messages is None:
            body = {"input": job.input, **({"model": job.model} if job.model else {})}
            return self._route("POST", "/v1/embeddings", body, job)
        if job.openai_route is None:
            return self._standard(job)
        if job.openai_route not in OPENAI_ROUTES:
            raise APIError(404, f"unknown openai_route {job.openai_route!r}; this worker serves "
                           + ", ".join(OPENAI_ROUTES), param="openai_route", code="unknown_route")
        method = "GET" if job.openai_route == "/v1/models" else "POST"
        return self._route(method, job.openai_route, job.openai_input or {}, job)

    async def _run(self, client: EngineClient, call: Call) -> CallRun:
        run = CallRun(client, call, self.settings.request_timeout_s)
        # However the job's task ends (done, failed, cancelled by RunPod while the
        # SDK was posting a batch), the engine slots are freed with it.
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: run.close())
        await run.start()
        return run

    async def _route(self, method: str, path: str, body: dict[str, Any], job: JobInput) -> AsyncIterator[Any]:
        """What the HTTP gateway answers to `method path` with `body`: one object,
        or (streaming) batches of whole events."""
        try:
            async for out in self._serve(method, path, body, job):
                yield out
        except APIError as e:
            if path.startswith("/v1/messages"):  # Anthropic's routes answer in Anthropic's shape
                raise JobError(json_encode(anthropic_error_body(e)).decode(), e) from None
            raise

    async def _serve(self, method: str, path: str, body: dict[str, Any], job: JobInput) -> AsyncIterator[Any]:
        if method == "GET" and path in ("/health", "/ping", "/version"):
            client = await self._engines()
            yield {"/version": lambda: to_builtins(Version(ready_engine(client).vllm_version, VERSION)),
                   "/health": lambda: to_builtins(Health("ok" if client.ready else "unavailable", client.describe())),
                   "/ping": lambda: {}}[path]()
            return
        if path.startswith("/v1/responses/"):
            yield to_builtins(await self._stored_response(method, path))
            return
        route = (method, path)
        if route not in JOB_ROUTES:
            raise APIError(404, f"no route {method} {path}; jobs reach " + ", ".join(f"{m} {p}" for m, p in JOB_ROUTES),
                           param="route", code="unknown_route")
        client = await self._engines()
        if path == "/v1/models":
            yield to_builtins(model_list(client))
            return
        engine = target(client, body.get("model") if isinstance(body.get("model"), str) else None,
                        "embed" if path == "/v1/embeddings" else None if path in ("/tokenize", "/detokenize")
                        else "generate")
        model = engine.model
        if path == "/tokenize":
            yield to_builtins(await tokenize(client, decode_or_400(tokenize_request_from_dict, body, "openai_input"), engine))
            return
        if path == "/detokenize":
            yield to_builtins(await detokenize(client, decode_or_400(detokenize_request_from_dict, body, "openai_input"),
                                               engine))
            return
        if path == "/v1/embeddings":
            req = decode_or_400(embedding_request_from_dict, body, "openai_input")
            yield to_builtins(await embeddings(client, req, engine))
            return
        if path == "/v1/messages/count_tokens":
            req = decode_or_400(count_tokens_request_from_dict, body, "openai_input")
            yield to_builtins(await messages.count_tokens(client, req, engine))
            return
        if path == "/v1/chat/completions":
            call = prepare_chat(decode_or_400(chat_request_from_dict, body, "openai_input"),
                                model, self.settings.response_role)
        elif path == "/v1/completions":
            call = prepare_completion(decode_or_400(completion_request_from_dict, body, "openai_input"),
                                      model, engine.max_model_len)
        elif path == "/v1/messages":
            call = messages.prepare(decode_or_400(messages_request_from_dict, body, "openai_input"), model)
        else:
            req = decode_or_400(responses_request_from_dict, body, "openai_input")
            prepared = responses.prepare(req, model, self.responses_store)
            if req.background:
                yield to_builtins(responses.start_background(client, prepared, self.responses_store,
                                                             self.settings.request_timeout_s))
                return
            call = prepared.call
        run = await self._run(client, call)
        if not call.stream:
            yield to_builtins(await run.collect())
            return
        raw = self.settings.raw_openai_output
        event = call.wire.event
        sizer = self._sizer(job)
        batch: list[Any] = []
        try:
            async with contextlib.aclosing(run.batches()) as batches:
                async for chunks in batches:
                    for chunk in chunks:
                        batch.append(event(chunk).decode() if raw else to_builtins(chunk))
                        if len(batch) >= sizer.size:
                            yield "".join(batch) if raw else batch
                            batch = []
                            sizer.grow()
        except APIError:
            if batch:  # what was generated before the failure still goes out
                yield "".join(batch) if raw else batch
            raise
        if raw and call.wire.done:
            batch.append(call.wire.done.decode())
        if batch:
            yield "".join(batch) if raw else batch

    async def _standard(self, job: JobInput) -> AsyncIterator[Any]:
        gen = job_generate(job, f"job-{uuid.uuid4().hex}")
        fmt = JobFormatter(gen.request_id, gen.params.n)
        run = await self._run(await self._engines(), Call([gen], fmt, "prompt", job.stream, exact=True))
        if not job.stream:
            yield to_builtins(await run.collect())
            return
        sizer = self._sizer(job)
        pending = fmt.empty()
        count = 0  # tokens in `pending`
        sent = 0  # tokens yielded before `pending`
        try:
            async with contextlib.aclosing(run.batches()) as batches:
                async for pieces in batches:
                    for index, text, tokens in pieces:
                        pending[index].append(text)
                        count += tokens
                        if count >= sizer.size:
                            sent += count
                            yield to_builtins(fmt.output(pending, sent))
                            pending, count = fmt.empty(), 0
                            sizer.grow()
        except APIError:
            if count:  # what was generated before the failure still goes out
                yield to_builtins(fmt.output(pending, sent + count))
            raise
        if count or any(pending):
            yield to_builtins(fmt.output(pending, sent + count))


def _parse(raw: Any) -> JobInput:
    if not isinstance(raw, dict):
        raise APIError(400, "the job input must be a JSON object", param="input")
    return decode_or_400(job_input_from_dict, raw, "job input")


# ------------------------------------------------------------------- the process


def main(argv: list[str]) -> int:
    """`vllm-gateway runpod [runpod SDK flags] [engine flags]`."""
    import runpod

    from vllm_gateway.gateway.supervisor.launcher import EngineProcesses, EngineStartFailed, wait_engines_ready

    try:
        settings = RunPodSettings.from_env()
    except ValueError as e:
        log.error("bad setting: %s", e)
        return 2
    # The SDK reads its own flags (--rp_serve_api, --test_input, ...) from sys.argv;
    # everything else is for the engines.
    _, engine_argv = runpod.serverless.parser.parse_known_args(argv)
    engines = None
    if settings.own_engines:
        try:
            engines = EngineProcesses(engine_argv)
        except ValueError as e:
            log.error("bad setting: %s", e)
            return 2
        settings.engine_endpoints = engines.endpoints
    # Until the SDK takes over (it handles SIGTERM itself), a stop while the
    # engines load is a normal stop: exit 0, engines stopped on the way out.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        try:
            statuses = wait_engines_ready(settings.engine_endpoints, engines,
                                          settings.engine_start_timeout_s, stop.is_set)
        except EngineStartFailed as e:
            if stop.is_set():
                log.info("stopped before the engines were ready")
                return 0
            log.error("the worker cannot start: %s", e)
            return e.exit_code
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("engines ready (model %s); starting the RunPod worker, concurrency %d",
                 statuses[0].model, settings.max_concurrency)
        if engines is not None:
            engines.supervise_in_thread()  # a dead engine is restarted; its jobs fail meanwhile
        handler = JobHandler(settings)
        metrics.watch_engines(lambda: handler._client)
        if settings.metrics_port:
            metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
            log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        sys.argv = [sys.argv[0], *argv]
        runpod.serverless.start({
            "handler": handler.handle,
            "concurrency_modifier": handler.concurrency,
            "return_aggregate_stream": True,
        })
        return 0
    finally:
        if engines is not None:
            engines.stop()
