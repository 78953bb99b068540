"""`GET /openapi.json`: an OpenAPI 3.1 document of every route the HTTP gateway
serves, generated from the same msgspec types that decode the requests and
encode the answers, so it cannot drift from what the server does."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Union

import msgspec

from vllm_gateway.gateway.anthropic.schemas import (
    BlockDelta,
    BlockStart,
    BlockStop,
    CountTokensRequest,
    ErrorBody,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    TokenCount_,
)
from vllm_gateway.gateway.openai.responses.schemas import (
    ArgumentsDelta,
    ArgumentsDone,
    Completed,
    Created,
    DeletedResponse,
    Incomplete,
    InProgress,
    ItemAdded,
    ItemDone,
    PartAdded,
    PartDone,
    ReasoningDelta,
    ReasoningDone,
    Response,
    ResponsesRequest,
    TextDelta,
    TextDone,
)
from vllm_gateway.gateway.openai.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    Health,
    LoadLoraRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraRequest,
    Version,
)

# The streamed events of the typed-event APIs, one union each.
ResponseEvent = Union[Created, InProgress, ItemAdded, PartAdded, TextDelta, TextDone, PartDone, ReasoningDelta,
                      ReasoningDone, ArgumentsDelta, ArgumentsDone, ItemDone, Completed, Incomplete]
MessagesEvent = Union[MessageStart, BlockStart, BlockDelta, BlockStop, MessageDelta, MessageStop]

JSON = "application/json"
SSE = "text/event-stream"
REF = "#/components/schemas/{name}"


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    body: type | None = None
    answer: type | None = None  # the 200 answer (JSON)
    chunk: type | None = None  # the streamed event's type, when `stream: true` is possible
    errors: tuple[int, ...] = ()
    other: str | None = None  # a 200 answer that is not JSON: its media type
    error_body: type = ErrorResponse  # the errors' shape (Anthropic's routes have their own)


# Every route of the HTTP gateway (app.py builds its routes from these).
OPERATIONS = (
    Operation("post", "/v1/chat/completions", "Create a chat completion (streamed as server-sent events with `stream: true`)",
              ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, (400, 404, 408, 413, 415, 503, 504)),
    Operation("post", "/v1/completions", "Create a text completion (streamed as server-sent events with `stream: true`)",
              CompletionRequest, Completion, Completion, (400, 404, 408, 413, 415, 503, 504)),
    Operation("post", "/v1/responses", "Create a response (OpenAI's Responses API; typed server-sent events with "
              "`stream: true`; `background: true` returns at once, queued)",
              ResponsesRequest, Response, ResponseEvent, (400, 404, 408, 413, 415, 503, 504)),
    Operation("get", "/v1/responses/{response_id}", "A stored response (kept per gateway)", answer=Response,
              errors=(404,)),
    Operation("delete", "/v1/responses/{response_id}", "Delete a stored response", answer=DeletedResponse,
              errors=(404,)),
    Operation("post", "/v1/responses/{response_id}/cancel", "Cancel a background response", answer=Response,
              errors=(400, 404)),
    Operation("post", "/v1/messages", "Create a message (Anthropic's Messages API; Anthropic's events with "
              "`stream: true`; errors in Anthropic's shape)", MessagesRequest, Message, MessagesEvent,
              (400, 404, 408, 413, 415, 503, 504), error_body=ErrorBody),
    Operation("post", "/v1/messages/count_tokens", "Count a message request's input tokens (Anthropic's)",
              CountTokensRequest, TokenCount_, errors=(400, 404, 408, 413, 415, 503), error_body=ErrorBody),
    Operation("get", "/v1/models", "The models served: base models, their LoRA adapters (with `parent`), "
              "embedding models", answer=ModelList, errors=(503,)),
    Operation("post", "/v1/embeddings", "Create embeddings (an embedding model's engine)", EmbeddingRequest,
              EmbeddingResponse, errors=(400, 404, 408, 413, 415, 503)),
    Operation("post", "/v1/load_lora_adapter", "Load a LoRA adapter on every engine of its base model "
              "(VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)", LoadLoraRequest, other="text/plain",
              errors=(400, 404, 408, 413, 415, 503)),
    Operation("post", "/v1/unload_lora_adapter", "Unload a LoRA adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)",
              UnloadLoraRequest, other="text/plain", errors=(400, 404, 408, 413, 415, 503)),
    Operation("get", "/health", "200 while an engine is ready; 503 (same body) otherwise or while draining",
              answer=Health, errors=(503,)),
    Operation("post", "/tokenize", "Tokenize a `prompt`, or `messages` as a chat request renders them (vLLM's route)",
              TokenizeRequest, TokenizeResponse, errors=(400, 404, 408, 413, 415, 503)),
    Operation("post", "/detokenize", "Token ids back to text (vLLM's route)", DetokenizeRequest, DetokenizeResponse,
              errors=(400, 404, 408, 413, 415, 503)),
    Operation("get", "/version", "The engines' vLLM version (and this gateway's)", answer=Version, errors=(503,)),
    Operation("get", "/ping", "200 while an engine is ready (load balancers, SageMaker); 503 otherwise",
              other=JSON, errors=(503,)),
    Operation("post", "/ping", "As GET /ping", other=JSON, errors=(503,)),
    Operation("get", "/metrics", "Prometheus metrics", other="text/plain"),
    Operation("get", "/openapi.json", "This document", other=JSON),
)

_REASONS = {400: "Bad request", 404: "Unknown model", 408: "The request body did not arrive in time",
            413: "Request body too large", 415: "Content-Type is not application/json",
            503: "No engine ready, or shutting down", 504: "REQUEST_TIMEOUT_S passed"}


def _content(schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def _name(t: Any) -> str:
    return {ResponseEvent: "ResponseEvent", MessagesEvent: "MessagesEvent"}.get(t) or t.__name__


def _sse_event(chunk: str) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 describes each event of a stream)."""
    typed = chunk in ("ResponseEvent", "MessagesEvent")  # `event:` lines, no [DONE]
    return {
        "type": "object",
        "properties": {"data": {"type": "string", "contentMediaType": JSON, "description": (
            f"a {chunk} as JSON, its `type` also in the event's `event:` line; on a failure an error event"
            if typed else f"a {chunk} as JSON; on a failure during the stream an ErrorResponse; last, `[DONE]`")}},
        "required": ["data"],
    }


def document(version: str = "0.1.0") -> dict[str, Any]:
    types = sorted({t for op in OPERATIONS for t in (op.body, op.answer, op.chunk, op.error_body) if t},
                   key=_name)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    ref = dict(zip(types, refs))
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        if op.answer is not None:
            ok = _content(ref[op.answer])
            if op.chunk is not None:
                ok.update(_content(_sse_event(_name(op.chunk)), SSE))
        else:
            ok = _content({"type": "object"} if op.other == JSON else {"type": "string"}, op.other or JSON)
        responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
        for status in op.errors:
            schema = ref[op.answer] if (op.answer is Health and status == 503) else ref[op.error_body]
            responses[str(status)] = {"description": _REASONS[status], "content": _content(schema)}
        item: dict[str, Any] = {"summary": op.summary, "operationId": f"{op.method}{op.path}", "responses": responses}
        if op.body is not None:
            item["requestBody"] = {"required": True, "content": _content(ref[op.body])}
        params = re.findall(r"{(\w+)}", op.path)
        if params:
            item["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                  for n in params]
        paths.setdefault(op.path, {})[op.method] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "vllm-gateway", "version": version,
                 "description": "OpenAI-compatible API of vllm-gateway (a CPU gateway in front of vLLM engines)."},
        "paths": paths,
        "components": {"schemas": components},
    }
