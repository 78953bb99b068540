"""The RunPod serverless worker: RunPod's job queue as an intake of the gateway.

`JobHandler.handle`, an async generator, is the SDK's handler. Jobs take the
input shapes of RunPod's worker-vllm (runpod/schemas.py): OpenAI mode
(`openai_route` + `openai_input`) and worker-vllm's generic `{route, method,
body}`, both answered by the table of operations, as the HTTP server answers
them; and standard mode (`prompt` / `messages` + `sampling_params`, this
package's own). Streamed output is batched: batch sizes grow min, min*g,
min*g^2, ... up to max.

A job that fails yields `{"error": <the route's error object as a JSON string>}`,
which the SDK turns into a FAILED job; the worker goes on with the next jobs. A
job RunPod cancels has its engine request aborted at once, and the
`CancelledError` goes on up to the SDK. Starting engines and the SDK is the
command line's (gateway/cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from vllm_gateway.gateway import metrics
from vllm_gateway.gateway.config import RunPodSettings
from vllm_gateway.gateway.core.calls import Call, CallRun, EventStream
from vllm_gateway.gateway.core.errors import APIError, decode_or_400
from vllm_gateway.gateway.core.operations import Context, Incoming, Operations, Result
from vllm_gateway.gateway.core.schema import from_dict, json_encode
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.runpod.schemas import JobInput, job_input_from_dict, to_builtins
from vllm_gateway.gateway.runpod.standard import JobFormatter, job_generate

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


class JobError(Exception):
    """A failed job, its error body in its route's shape."""

    def __init__(self, body: str, error: APIError) -> None:
        super().__init__(error.message)
        self.body = body
        self.error = error


class JobHandler:
    def __init__(self, settings: RunPodSettings, operations: Operations) -> None:
        self.settings = settings
        self.operations = operations
        # The routes a job reaches by `openai_route` (POST, or GET for what has no POST).
        self.openai_routes = tuple(dict.fromkeys(op.path for op in operations if op.jobs and "{" not in op.path))
        self._ctx: Context | None = None
        self._runs: set[CallRun] = set()  # the jobs' engine calls running now
        self._background: set[asyncio.Future] = set()

    @property
    def client(self) -> EngineClient | None:
        return self._ctx.client if self._ctx is not None else None

    def concurrency(self, current: int) -> int:
        # Constant: the SDK (1.10) resizes its job queue only once it is empty, and
        # runs no queued job at concurrency 0, so a changing figure can deadlock
        # it. Whether jobs are taken at all is `ready_for_jobs`' to say.
        return self.settings.max_concurrency

    def ready_for_jobs(self) -> bool:
        """Take jobs only while an engine is ready to serve them (they would only
        wait or fail otherwise) and the worker is not stopping."""
        ctx = self._ensure_context()
        return ctx.client.ready and not ctx.draining

    def _ensure_context(self) -> Context:
        # Made in the event loop the SDK runs jobs in, at its first question.
        if self._ctx is None:
            s = self.settings
            client = EngineClient(s.engine_endpoints, engine_timeout_s=s.engine_timeout_s, router=s.routing.router())
            self._ctx = Context(client, s, self.operations)
            self._background.add(asyncio.ensure_future(client.start()))
            self._watch_stop()
        return self._ctx

    async def _context(self) -> Context:
        ctx = self._ensure_context()
        if not ctx.client.ready:
            await ctx.client.wait_ready(self.settings.engine_wait_s)
        return ctx

    def _watch_stop(self) -> None:
        """On SIGTERM the SDK stops taking jobs and waits for the running ones
        for as long as they take; RunPod kills the worker after its grace period.
        So the jobs still running after DRAIN_TIMEOUT_S end with an error result
        the SDK posts, rather than being cut off silently."""
        loop = asyncio.get_running_loop()
        sdk_handler = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame) -> None:
            if callable(sdk_handler):
                sdk_handler(signum, frame)
            loop.call_soon_threadsafe(lambda: self._background.add(loop.create_task(self._drain())))

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (a test calling the handler directly)
            pass

    async def _drain(self) -> None:
        assert self._ctx is not None
        self._ctx.draining = True
        grace = self.settings.drain_timeout_s
        log.info("stopping: %d job(s) running, up to %.0f s", len(self._runs), grace)
        deadline = time.monotonic() + grace
        while self._runs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in list(self._runs):
            run.rs.interrupt(APIError(503, f"the worker stopped before the job finished (DRAIN_TIMEOUT_S={grace:g})",
                                      type="service_unavailable_error", code="shutting_down"))

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
            label = route if route == "standard" else self.operations.route_label(route) if isinstance(route, str) \
                else "other"
            metrics.REQUESTS.labels(label, status).inc()

    def _outputs(self, job: JobInput) -> AsyncIterator[Any]:
        if job.route is not None:
            return self._route(job.method.upper(), job.route, job.body or {}, job)
        if job.openai_route is None and job.input is not None and job.prompt is None and job.messages is None:
            body = {"input": job.input, **({"model": job.model} if job.model else {})}
            return self._route("POST", "/v1/embeddings", body, job)
        if job.openai_route is None:
            return self._standard(job)
        if job.openai_route not in self.openai_routes:
            raise APIError(404, f"unknown openai_route {job.openai_route!r}; this worker serves "
                           + ", ".join(self.openai_routes), param="openai_route", code="unknown_route")
        methods = {op.method for op, _ in self.operations.at(job.openai_route)}
        method = "POST" if "post" in methods else "GET"
        return self._route(method, job.openai_route, job.openai_input or {}, job)

    async def _run(self, client: EngineClient, call: Call) -> CallRun:
        run = CallRun(client, call, self.settings.request_timeout_s)
        self._runs.add(run)
        # However the job's task ends (done, failed, cancelled by RunPod while the
        # SDK was posting a batch), the engine slots are freed with it.
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: (run.close(), self._runs.discard(run)))
        await run.start()
        return run

    async def _route(self, method: str, path: str, body: dict[str, Any], job: JobInput) -> AsyncIterator[Any]:
        """What the HTTP gateway answers to `method path` with `body`: one object,
        or (streaming) batches of whole events; errors in the route's shape."""
        found = self.operations.find(method, path)
        if found is None or not found[0].jobs:
            routes = ", ".join(f"{op.method.upper()} {op.path}" for op in self.operations if op.jobs)
            raise APIError(404, f"no route {method} {path}; jobs reach {routes}", param="route", code="unknown_route")
        op, params = found
        try:
            # A route without a body (GET) reads openai_input as its query parameters.
            query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items()} \
                if not op.body and isinstance(body, dict) else {}
            request = Incoming(decode_or_400(from_dict(op.body), body, "openai_input") if op.body else None, params,
                               query=query)
            ctx = await self._context()
            out = await op.handler(ctx, request)
            if isinstance(out, EventStream):
                async for batch in self._replay(out):
                    yield batch
                return
            if not isinstance(out, Call):
                value = to_builtins(out.body if isinstance(out, Result) else out)
                if isinstance(value, dict) and value.get("error"):
                    # The SDK reads a top-level "error" as the job's failure: a stored
                    # response that failed, fetched successfully, goes out as its JSON text.
                    value = json_encode(value).decode()
                yield value
                return
            async for batch in self._stream(ctx, out, job):
                yield batch
        except APIError as e:
            raise JobError(op.errors_as.body(e).decode(), e) from None

    async def _stream(self, ctx: Context, call: Call, job: JobInput) -> AsyncIterator[Any]:
        run = await self._run(ctx.client, call)
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

    async def _replay(self, stream: EventStream) -> AsyncIterator[Any]:
        """Stored events (a background response's, replayed), a batch each as they come."""
        raw = self.settings.raw_openai_output
        async for batch in stream.batches:
            yield "".join(stream.wire.event(e).decode() for e in batch) if raw else [to_builtins(e) for e in batch]

    async def _standard(self, job: JobInput) -> AsyncIterator[Any]:
        gen = job_generate(job, f"job-{uuid.uuid4().hex}")
        fmt = JobFormatter(gen.request_id, gen.params.n)
        ctx = await self._context()
        run = await self._run(ctx.client, Call([gen], fmt, "prompt", job.stream, exact=True))
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


def run(settings: RunPodSettings, operations: Operations, argv: list[str]) -> None:
    """Take jobs from RunPod's queue until the SDK stops (engines are ready)."""
    import sys

    import runpod

    from runpod.serverless.modules import rp_scale

    handler = JobHandler(settings, operations)
    take = rp_scale.get_job

    async def take_when_ready(session, num_jobs: int):
        # The SDK's job fetch, asked only while an engine can serve the jobs. The SDK
        # offers no hook for it outside its local test mode, so its module's fetch
        # function is wrapped before the SDK's job scaler picks it up (runpod is
        # pinned; tests/integration/test_runpod.py covers it).
        if not handler.ready_for_jobs():
            await asyncio.sleep(0.5)
            return None
        return await take(session, num_jobs)

    rp_scale.get_job = take_when_ready
    metrics.watch_engines(lambda: handler.client)
    if settings.metrics_port:
        metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
        log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    sys.argv = [sys.argv[0], *argv]
    runpod.serverless.start({
        "handler": handler.handle,
        "concurrency_modifier": handler.concurrency,
        "return_aggregate_stream": True,
    })
