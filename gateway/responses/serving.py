"""`/v1/responses`, whichever intake it came from: a request prepared as a chat
call with a Responses formatter, stored when asked, chained to a stored
response, run in the background, fetched, replayed, deleted or cancelled, on
whichever gateway shares the store."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

import msgspec

from vllm_gateway.gateway.core.admission import Admission
from vllm_gateway.gateway.core.calls import Call, EventStream, Wire
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.generate import chat_generate, check_model
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.responses import convert
from vllm_gateway.gateway.responses.background import Runner
from vllm_gateway.gateway.responses.formatting import ResponsesFormatter, now
from vllm_gateway.gateway.responses.schemas import (
    DeletedResponse,
    ErrorEvent,
    Response,
    ResponseError,
    ResponsesRequest,
    ResponseStreamEvent,
)
from vllm_gateway.gateway.responses.store import Record, ResponseStore, Stored

log = logging.getLogger("gateway.responses")


def _event(obj: Any) -> bytes:
    return b"event: " + type(obj).__struct_config__.tag.encode() + b"\ndata: " + json_encode(obj) + b"\n\n"


def _error(e: APIError) -> bytes:
    return _event(ErrorEvent(message=e.message, code=str(e.code) if e.code is not None else e.type, param=e.param))


# Typed events (`event:` and `data:` lines), no `[DONE]`, as OpenAI streams them.
RESPONSES_WIRE = Wire(event=_event, done=b"", error=_error)


@dataclasses.dataclass
class Responses:
    """A serving process's stored responses and the background ones it runs."""

    store: ResponseStore
    runner: Runner

    @classmethod
    def of(cls, store: ResponseStore) -> "Responses":
        return cls(store, Runner(store))

    async def close(self, why: str) -> None:
        await self.runner.fail_running(why)
        await self.store.close()


@dataclasses.dataclass
class Prepared:
    call: Call
    fmt: ResponsesFormatter
    conversation: list[dict[str, Any]]


_decode_event = msgspec.json.Decoder(ResponseStreamEvent).decode
REPLAY_POLL_S = 0.1  # a response run by another gateway: how often a replay looks for new events
CANCEL_WAIT_S = 10.0  # a cancel on another gateway: how long cancel waits to see it end


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found", param="response_id",
                    code="response_not_found")


async def read(rs: Responses, response_id: str, owner: str | None) -> Stored | None:
    """A stored response. One whose gateway died (its lease lapsed) is ended
    `failed` here: accepted work ends visibly, never stuck `in_progress`."""
    stored = await rs.store.get(response_id, owner)
    if (stored is not None and stored.running and response_id not in rs.runner.tasks
            and stored.lease < time.time()):
        log.warning("background response %s: its gateway's lease lapsed %.1f s ago; ending it failed",
                    response_id, time.time() - stored.lease)
        failed = msgspec.structs.replace(stored.response, status="failed", error=ResponseError(
            "server_error", "the gateway running this response stopped before it finished"))
        await rs.store.update(failed, stored.record.conversation, owner)
        stored = Stored(Record(failed, stored.record.conversation, owner))
    return stored


async def prepare(req: ResponsesRequest, model: str, rs: Responses, owner: str | None = None) -> Prepared:
    check_model(req.model, model)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = await read(rs, req.previous_response_id, owner)
        if previous is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found",
                           param="previous_response_id", code="previous_response_not_found")
        if previous.running:
            raise APIError(400, f"Previous response '{req.previous_response_id}' is still {previous.response.status}; "
                                "chain from it once it has finished", param="previous_response_id")
        history = previous.record.conversation + convert.output_messages(previous.response.output)
    if req.background and not req.store:
        raise APIError(400, "background responses must be stored (store: true)", param="background")
    gen = chat_generate(convert.chat_request(req, history, stream=req.stream or req.background),
                        f"resp-{uuid.uuid4().hex}")
    gen.model = model
    template = Response(
        id=f"resp_{uuid.uuid4().hex}", created_at=now(), model=model, status="in_progress",
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, tools=list(req.tools or []), tool_choice=req.tool_choice or "auto",
        parallel_tool_calls=req.parallel_tool_calls is not False, text=req.text, reasoning=req.reasoning,
        metadata=req.metadata, user=req.user, store=req.store, previous_response_id=req.previous_response_id,
        background=req.background,
    )
    fmt = ResponsesFormatter(gen.request_id, template)
    call = Call([gen], fmt, "input", req.stream or req.background, closing=fmt.closing, opening=fmt.opening,
                wire=RESPONSES_WIRE)
    conversation = history + convert.input_messages(req.input)
    if req.store:
        rs.store.check_size(template, conversation, owner)  # an oversized one: a 400 before anything runs
        if not req.background:
            async def persist() -> None:
                assert fmt.final is not None
                await rs.store.create(fmt.final, conversation, owner)

            call.finish = persist
    return Prepared(call, fmt, conversation)


async def start_background(rs: Responses, client: EngineClient, prepared: Prepared, timeout_s: float,
                           owner: str | None = None, admission: Admission | None = None,
                           stream: bool = False) -> Response | EventStream:
    """Run the response without the client: stored now as `queued` (a full or
    unreachable store refuses it here, before it runs), then updated as it goes,
    its events stored for replay. However it ends, it ends in the store with
    that status. With `stream`, the answer is its events, replayed as they come:
    the client may go away and resume with `GET ...?stream=true&starting_after=N`."""
    queued = prepared.fmt.snapshot("queued")
    await rs.store.create(queued, prepared.conversation, owner)
    rs.runner.start(client, prepared.call, timeout_s, prepared.conversation, owner, admission)
    if stream:
        return await replay(rs, queued.id, owner, -1)
    return queued


async def fetch(rs: Responses, response_id: str, owner: str | None = None) -> Response:
    stored = await read(rs, response_id, owner)
    if stored is None:
        raise not_found(response_id)
    return stored.response


async def replay(rs: Responses, response_id: str, owner: str | None, after: int) -> EventStream:
    """A background response's events numbered above `after`, then those still
    to come, until it ends (as vLLM and OpenAI resume a stream)."""
    stored = await read(rs, response_id, owner)
    if stored is None:
        raise not_found(response_id)
    if not stored.response.background:
        raise APIError(400, "only background responses can be streamed again (create them with background: true)",
                       param="stream")

    async def batches():
        n = after
        while True:
            raw = await rs.store.events(response_id, n)
            if not raw:
                now = await read(rs, response_id, owner)
                if now is None or not now.running:
                    raw = await rs.store.events(response_id, n)  # the last ones, stored before it ended
                    if raw:
                        yield [_decode_event(e) for e in raw]
                    return
                await rs.runner.wait_news(response_id, REPLAY_POLL_S)
                continue
            n += len(raw)
            yield [_decode_event(e) for e in raw]

    return EventStream(batches(), RESPONSES_WIRE)


async def delete(rs: Responses, response_id: str, owner: str | None = None) -> DeletedResponse:
    if not await rs.store.delete(response_id, owner):
        raise not_found(response_id)
    rs.runner.cancel(response_id)  # run here: stopped now (elsewhere: its gateway sees it gone)
    return DeletedResponse(response_id)


async def cancel(rs: Responses, response_id: str, owner: str | None = None) -> Response:
    stored = await read(rs, response_id, owner)
    if stored is None:
        raise not_found(response_id)
    if not stored.response.background:
        raise APIError(400, "only background responses can be cancelled", param="response_id")
    if not stored.running:
        return stored.response  # finished: cancelling changes nothing
    task = rs.runner.cancel(response_id)
    if task is not None:
        await asyncio.wait([task])  # however it ended, it is in the store now
    else:
        # Run by another gateway: it sees the request within LEASE_RENEW_S,
        # aborts the engine request and stores the response as cancelled.
        await rs.store.request_cancel(response_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = await read(rs, response_id, owner)
            if now is None or not now.running:
                break
    final = await read(rs, response_id, owner)
    return (final or stored).response
