"""The Responses API's operations: handlers and their rows in the table. The
stored responses are this package's: one store per serving process, kept in
the context."""

from __future__ import annotations

from typing import Union

from vllm_gateway.gateway.core.calls import Call, target
from vllm_gateway.gateway.core.operations import Context, Incoming, Operation
from vllm_gateway.gateway.responses import serving
from vllm_gateway.gateway.responses.schemas import (
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
from vllm_gateway.gateway.responses.store import ResponseStore

# The streamed events, as one union (for /openapi.json).
ResponseStreamEvent = Union[Created, InProgress, ItemAdded, PartAdded, TextDelta, TextDone, PartDone, ReasoningDelta,
                            ReasoningDone, ArgumentsDelta, ArgumentsDone, ItemDone, Completed, Incomplete]


def store(ctx: Context) -> ResponseStore:
    """This process's stored responses (made on first use)."""
    found = ctx.state.get("responses")
    if found is None:
        found = ctx.state["responses"] = ResponseStore(ctx.settings.responses_store_size,
                                                       ctx.settings.responses_store_ttl_s)
        ctx.closing.append(lambda: serving.fail_running(found, "the gateway stopped before the response finished"))
    return found


async def create(ctx: Context, r: Incoming) -> Call | Response:
    req: ResponsesRequest = r.body
    prepared = serving.prepare(req, target(ctx.client, req.model).model, store(ctx), r.owner)
    if req.background:
        return serving.start_background(ctx.client, prepared, store(ctx), ctx.settings.request_timeout_s, r.owner,
                                        ctx.admission)
    return prepared.call


async def get(ctx: Context, r: Incoming) -> Response:
    return serving.fetch(store(ctx), r.params["response_id"], r.owner)


async def delete(ctx: Context, r: Incoming) -> DeletedResponse:
    return serving.delete(store(ctx), r.params["response_id"], r.owner)


async def cancel(ctx: Context, r: Incoming) -> Response:
    return await serving.cancel(store(ctx), r.params["response_id"], r.owner)


OPERATIONS = (
    Operation("post", "/v1/responses", "Create a response (OpenAI's Responses API; typed server-sent events with "
              "`stream: true`; `background: true` returns at once, queued)", create, ResponsesRequest, Response,
              ResponseStreamEvent, (400, 404, 408, 413, 415, 503, 504), work=True),
    Operation("get", "/v1/responses/{response_id}", "A stored response (kept per gateway)", get, answer=Response,
              errors=(404,)),
    Operation("delete", "/v1/responses/{response_id}", "Delete a stored response", delete, answer=DeletedResponse,
              errors=(404,)),
    Operation("post", "/v1/responses/{response_id}/cancel", "Cancel a background response", cancel, answer=Response,
              errors=(400, 404)),
)
