"""The server's own operations: health and readiness for probes and balancers,
the engines' version, metrics, and the API document."""

from __future__ import annotations

from vllm_gateway.gateway import VERSION, metrics
from vllm_gateway.gateway.core.calls import ready_engine
from vllm_gateway.gateway.core.operations import JSON, Context, Incoming, Operation, Result
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.http import openapi
from vllm_gateway.gateway.http.schemas import Health, Version


async def health(ctx: Context, _: Incoming) -> Result:
    """200 while at least one engine is ready and the server is not draining;
    the body lists every engine's state and load."""
    engines = ctx.client.describe()
    if ctx.draining:
        return Result(Health("draining", engines), 503)
    if ctx.client.ready:
        return Result(Health("ok", engines))
    return Result(Health("unavailable", engines), 503)


async def ping(ctx: Context, _: Incoming) -> Result:
    """200 while an engine is ready and the server is not draining (vLLM's
    /ping, for load balancers and SageMaker); 204 while the engines are still
    loading (RunPod's load-balancing endpoints: starting, not sick); 503 when
    draining or every engine has failed."""
    client = ctx.client
    if ctx.draining:
        return Result({}, 503)
    if client.ready:
        return Result({}, 200)
    if any(e.state == "failed" for e in client.describe()):
        return Result({}, 503)
    return Result(b"", 204)


async def version(ctx: Context, _: Incoming) -> Version:
    return Version(ready_engine(ctx.client).vllm_version, VERSION)


async def prometheus(ctx: Context, _: Incoming) -> Result:
    body, content_type = metrics.exposition()
    return Result(body, media_type=content_type)


async def document(ctx: Context, _: Incoming) -> Result:
    spec = ctx.state.get("openapi.json")
    if spec is None:  # made once, from the table the context serves
        spec = ctx.state["openapi.json"] = json_encode(openapi.document(ctx.operations, VERSION))
    return Result(spec)


OPERATIONS = (
    Operation("get", "/health", "200 while an engine is ready; 503 (same body) otherwise or while draining", health,
              answer=Health, errors=(503,), answered_as_ok=(503,)),
    Operation("get", "/version", "The engines' vLLM version (and this gateway's)", version, answer=Version,
              errors=(503,)),
    Operation("get", "/ping", "200 while an engine is ready (load balancers, SageMaker); 204 while the engines load "
              "(RunPod's load balancer); 503 when draining or failed", ping, other=JSON, errors=(503,)),
    Operation("post", "/ping", "As GET /ping", ping, other=JSON, errors=(503,)),
    Operation("get", "/metrics", "Prometheus metrics", prometheus, other="text/plain", jobs=False),
    Operation("get", "/openapi.json", "This document", document, other=JSON, jobs=False),
)
