"""The Responses API's operations: handlers and their rows in the table. The
stored responses are this package's: one store (and one runner of background
responses) per serving process, kept in the context."""

from __future__ import annotations

from vllm_gateway.gateway.core.calls import Call, EventStream, target
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.operations import Context, Incoming, Operation
from vllm_gateway.gateway.responses import serving
from vllm_gateway.gateway.responses.schemas import DeletedResponse, Response, ResponsesRequest, ResponseStreamEvent
from vllm_gateway.gateway.responses.store import ResponseStore


def responses(ctx: Context) -> serving.Responses:
    """This process's stored responses and background runs (made on first use)."""
    found = ctx.state.get("responses")
    if found is None:
        found = ctx.state["responses"] = serving.Responses.of(ResponseStore(ctx.settings.responses_store))
        ctx.closing.append(lambda: found.close("the gateway stopped before the response finished"))
    return found


async def create(ctx: Context, r: Incoming) -> Call | Response | EventStream:
    req: ResponsesRequest = r.body
    rs = responses(ctx)
    prepared = await serving.prepare(req, target(ctx.client, req.model).model, rs, r.owner)
    if req.background:
        return await serving.start_background(rs, ctx.client, prepared, ctx.settings.request_timeout_s, r.owner,
                                              ctx.admission, stream=req.stream)
    return prepared.call


def _flag(query: dict[str, str], name: str) -> bool:
    raw = query.get(name, "false").strip().lower()
    if raw not in ("true", "false", "1", "0"):
        raise APIError(400, f"{name} must be true or false, not {raw!r}", param=name)
    return raw in ("true", "1")


async def get(ctx: Context, r: Incoming) -> Response | EventStream:
    """The stored response; with `stream=true`, a background response's events
    from `starting_after` on (a client resuming a stream it lost)."""
    rid = r.params["response_id"]
    if not _flag(r.query, "stream"):
        return await serving.fetch(responses(ctx), rid, r.owner)
    raw = r.query.get("starting_after", "-1")
    try:
        after = int(raw)
    except ValueError:
        after = -2
    if after < -1:
        raise APIError(400, f"starting_after must be a sequence number (an integer from -1), not {raw!r}",
                       param="starting_after")
    return await serving.replay(responses(ctx), rid, r.owner, after)


async def delete(ctx: Context, r: Incoming) -> DeletedResponse:
    return await serving.delete(responses(ctx), r.params["response_id"], r.owner)


async def cancel(ctx: Context, r: Incoming) -> Response:
    return await serving.cancel(responses(ctx), r.params["response_id"], r.owner)


OPERATIONS = (
    Operation("post", "/v1/responses", "Create a response (OpenAI's Responses API; typed server-sent events with "
              "`stream: true`; `background: true` returns at once, queued)", create, ResponsesRequest, Response,
              ResponseStreamEvent, (400, 404, 408, 413, 415, 429, 503, 504), work=True),
    Operation("get", "/v1/responses/{response_id}", "A stored response (in RESPONSES_STORE, shared by the gateways "
              "using it); `?stream=true&starting_after=N` replays a background response's events after N", get,
              answer=Response, chunk=ResponseStreamEvent, errors=(400, 404, 503),
              query=(("stream", {"type": "boolean"}), ("starting_after", {"type": "integer", "minimum": -1}))),
    Operation("delete", "/v1/responses/{response_id}", "Delete a stored response", delete, answer=DeletedResponse,
              errors=(404, 503)),
    Operation("post", "/v1/responses/{response_id}/cancel", "Cancel a background response, on whichever gateway "
              "runs it", cancel, answer=Response, errors=(400, 404, 503)),
)
