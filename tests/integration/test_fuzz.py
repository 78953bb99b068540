"""Schema-driven fuzzing of the real gateway and engine: schemathesis generates
requests from the gateway's own `/openapi.json`, valid ones and ones that break
the schema, for every route. Checked for each: no 5xx; every 4xx an OpenAI error
object; the status, content type and body conform to the document; data that
breaks the schema is refused. Afterwards the server is still healthy.

Bounded by time (`FUZZ_SECONDS`, default 120) and count (`FUZZ_EXAMPLES` per
generation mode, default 2000). By hand, for the README's figure:
`FUZZ_SECONDS=3600 FUZZ_EXAMPLES=6000 .venv/bin/python -m pytest -s tests/integration/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from support import MODEL

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "120"))
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
# Generation cost only: a valid request may ask for up to the whole context on
# 128 choices, which a CPU answers in minutes. Larger values are exercised by the
# negative cases and by tests/integration/test_hostile_bodies.py.
CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "min_tokens": 4, "n": 2, "best_of": 2}


def bound_cost(case) -> None:
    body = case.body
    if not isinstance(body, dict) or case.meta is None or not case.meta.generation.mode.is_positive:
        return
    for field, cap in CAPS.items():
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool) and body[field] > cap:
            body[field] = cap
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = CAPS["max_tokens"]
    if "input" in body and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = CAPS["max_output_tokens"]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 4 and all(isinstance(p, (str, list)) for p in prompt):
        body["prompt"] = prompt[:4]


def openai_error_object(response, case) -> None:
    """Every 4xx is an error object: OpenAI's, or Anthropic's on /v1/messages."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
            assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
            return
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err


def test_fuzz_every_route(gateway_url, http):
    schema = schemathesis.openapi.from_url(gateway_url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection]
    started = time.monotonic()
    seen: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(st.data())
    def fuzz(data):
        mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
        case = data.draw(schema.as_strategy(mode))
        if time.monotonic() - started > FUZZ_SECONDS:
            return  # drawn all the same: hypothesis wants the same draws every run
        bound_cost(case)
        response = case.call(base_url=gateway_url, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        openai_error_object(response, case)
        # A body over MAX_REQUEST_BODY_BYTES is refused (413) before it is read:
        # that is a rejection too, whatever schemathesis expects of negative data.
        case.validate_response(response, checks=checks if response.status_code != 413 else
                               [c for c in checks if c is not negative_data_rejection])

    fuzz()
    total = sum(seen.values())
    print(f"\nfuzz: {total} requests in {time.monotonic() - started:.0f} s, by status: {dict(sorted(seen.items()))}")
    assert total >= 100
    assert not any(status >= 500 for status in seen)
    assert http.get("/health").status_code == 200
    r = httpx.post(gateway_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_openapi_document_lists_every_route(http):
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                 "/metrics", "/openapi.json", "/tokenize", "/detokenize", "/version", "/ping",
                                 "/v1/responses", "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
                                 "/v1/messages", "/v1/messages/count_tokens", "/v1/embeddings",
                                 "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    request = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    props = doc["components"]["schemas"][request]["properties"]
    assert {"messages", "temperature", "n", "stop", "stream", "max_tokens", "tools", "tool_choice",
            "response_format", "structured_outputs", "guided_json"} <= set(props)
    assert props["n"]["maximum"] == 128
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/version"])
def test_documented_answers_match(http, path):
    """The GET routes' answers validate against the document (schemathesis' own check)."""
    schema = schemathesis.openapi.from_url(str(http.base_url) + "/openapi.json")
    case = schema[path]["GET"].Case()
    case.validate_response(case.call(base_url=str(http.base_url)), checks=[response_schema_conformance])
