"""One table of operations behind every intake: the HTTP app's routes, the
OpenAPI document and RunPod's job router are all read from it."""

from __future__ import annotations

import asyncio

import pytest

from vllm_gateway.gateway.anthropic.errors import ANTHROPIC_ERRORS
from vllm_gateway.gateway.api import operations
from vllm_gateway.gateway.config import GatewaySettings, RunPodSettings
from vllm_gateway.gateway.core.errors import OPENAI_ERRORS
from vllm_gateway.gateway.core.operations import Operation, Operations
from vllm_gateway.gateway.http import openapi
from vllm_gateway.gateway.http.app import build_app
from vllm_gateway.gateway.runpod.schemas import job_input_from_dict
from vllm_gateway.gateway.runpod.worker import JobError, JobHandler


def test_http_routes_and_openapi_are_the_table(tmp_path):
    ops = operations()
    table = {(op.method, op.path) for op in ops}
    app = build_app(GatewaySettings(engine_endpoints=[f"ipc://{tmp_path}/none"]), ops)
    try:
        served = {(m.lower(), r.path) for r in app.routes for m in r.methods if m != "HEAD"}
        assert served == table
    finally:
        asyncio.run(app.state.ctx.client.close())
    doc = openapi.document(ops)
    assert {(method, path) for path, item in doc["paths"].items() for method in item} == table
    # each route's errors in its shape
    for op in ops:
        for status in op.errors:
            ref = doc["paths"][op.path][op.method]["responses"][str(status)]["content"]["application/json"]["schema"]
            expected = (op.answer if status in op.answered_as_ok else op.errors_as.schema).__name__
            assert ref["$ref"].endswith("/" + expected), (op.path, status, ref)


def test_lookups_by_method_path_and_parameters():
    ops = operations()
    op, params = ops.find("DELETE", "/v1/responses/resp_1")
    assert op.path == "/v1/responses/{response_id}" and params == {"response_id": "resp_1"}
    assert ops.find("post", "/v1/responses/resp_1/cancel")[1] == {"response_id": "resp_1"}
    assert ops.find("GET", "/v1/chat/completions") is None  # a path served, by another method
    assert ops.find("POST", "/nowhere") is None
    assert ops.errors_for("/v1/messages") is ANTHROPIC_ERRORS and ops.errors_for("/v1/messages/count_tokens") is ANTHROPIC_ERRORS
    assert ops.errors_for("/v1/chat/completions") is OPENAI_ERRORS and ops.errors_for("/nowhere") is OPENAI_ERRORS
    assert ops.route_label("/v1/responses/abc") == "/v1/responses/{response_id}" and ops.route_label("/x") == "other"


def test_an_operation_defined_twice_is_refused():
    async def h(ctx, r):
        return {}

    with pytest.raises(ValueError, match="defined twice"):
        Operations([Operation("get", "/a", "", h), Operation("get", "/a", "", h)])


def test_jobs_reach_the_table_and_answer_in_the_routes_shape():
    ops = operations()
    worker = JobHandler(RunPodSettings(), ops)
    assert set(worker.openai_routes) == {op.path for op in ops if op.jobs and "{" not in op.path}
    assert "/v1/load_lora_adapter" not in worker.openai_routes  # not offered to jobs

    async def first(job: dict):
        outputs = worker._outputs(job_input_from_dict(job))
        return await outputs.__anext__()

    with pytest.raises(JobError) as e:  # a bad body on Anthropic's route: Anthropic's error, before any engine
        asyncio.run(first({"route": "/v1/messages", "body": {"max_tokens": 1}}))
    assert e.value.error.status == 400 and '"type":"error"' in e.value.body
    with pytest.raises(JobError) as e:
        asyncio.run(first({"openai_route": "/v1/chat/completions", "openai_input": {"messages": "no"}}))
    assert e.value.error.param == "messages" and '"error":{"message"' in e.value.body
    with pytest.raises(Exception) as e:
        asyncio.run(first({"route": "/v1/load_lora_adapter", "body": {}}))
    assert getattr(e.value, "status", None) == 404


def test_probes_answer_as_the_manifests_use_them(tmp_path):
    """No engine ready: readiness (/v1/models, as llm-d's guides use it) and
    /health say 503; liveness (/metrics) answers, so a pod whose engines restart
    is not killed."""
    import httpx

    app = build_app(GatewaySettings(engine_endpoints=[f"ipc://{tmp_path}/none"]), operations())

    async def probe() -> dict[str, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as c:
            return {path: (await c.get(path)).status_code for path in ("/v1/models", "/health", "/metrics")}

    try:
        assert asyncio.run(probe()) == {"/v1/models": 503, "/health": 503, "/metrics": 200}
    finally:
        asyncio.run(app.state.ctx.client.close())
