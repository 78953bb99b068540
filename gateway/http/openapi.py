"""`GET /openapi.json`: an OpenAPI 3.1 document of every route the HTTP gateway
serves, generated from the table of operations and the same msgspec types that
decode the requests and encode the answers, so it cannot drift from what the
server does."""

from __future__ import annotations

import re
import typing
from typing import Any

import msgspec

from vllm_gateway.gateway.core.operations import Operations

JSON = "application/json"
SSE = "text/event-stream"
REF = "#/components/schemas/{name}"

_REASONS = {400: "Bad request", 404: "Not found (a model, a stored response)",
            408: "The request body did not arrive in time", 413: "Request body too large",
            415: "Content-Type is not application/json", 429: "Over a limit: retry after Retry-After",
            503: "No engine ready, shutting down, or the response store unavailable", 504: "REQUEST_TIMEOUT_S passed"}


def _content(schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def _typed(t: Any) -> bool:
    """A union of event types: streamed with `event:` lines, no [DONE]."""
    return typing.get_origin(t) is typing.Union


def _name(t: Any) -> str:
    if _typed(t):
        return " | ".join(a.__name__ for a in typing.get_args(t))
    return t.__name__


def _sse_event(chunk: Any) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 describes each event of a stream)."""
    return {
        "type": "object",
        "properties": {"data": {"type": "string", "contentMediaType": JSON, "description": (
            f"one of {_name(chunk)} as JSON, its `type` also in the event's `event:` line; on a failure an error "
            "event" if _typed(chunk) else
            f"a {_name(chunk)} as JSON; on a failure during the stream an ErrorResponse; last, `[DONE]`")}},
        "required": ["data"],
    }


def document(operations: Operations, version: str = "0.1.0") -> dict[str, Any]:
    types = sorted({t for op in operations for t in (op.body, op.answer, op.chunk, op.errors_as.schema) if t},
                   key=_name)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    ref = dict(zip(types, refs))
    paths: dict[str, Any] = {}
    for op in operations:
        if op.answer is not None:
            ok = _content(ref[op.answer])
            if op.chunk is not None:
                ok.update(_content(_sse_event(op.chunk), SSE))
        else:
            ok = _content({"type": "object"} if op.other == JSON else {"type": "string"}, op.other or JSON)
        responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
        for status in op.errors:
            schema = ref[op.answer] if status in op.answered_as_ok else ref[op.errors_as.schema]
            responses[str(status)] = {"description": _REASONS[status], "content": _content(schema)}
        item: dict[str, Any] = {"summary": op.summary, "operationId": f"{op.method}{op.path}", "responses": responses}
        if op.body is not None:
            item["requestBody"] = {"required": True, "content": _content(ref[op.body])}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", op.path)]
        params += [{"name": n, "in": "query", "required": False, "schema": schema} for n, schema in op.query]
        if params:
            item["parameters"] = params
        paths.setdefault(op.path, {})[op.method] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "vllm-gateway", "version": version,
                 "description": "OpenAI-compatible API of vllm-gateway (a CPU gateway in front of vLLM engines)."},
        "paths": paths,
        "components": {"schemas": components},
    }
