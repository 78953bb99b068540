"""`/v1/responses`, whichever intake it came from: a request prepared as a chat
call with a Responses formatter, stored when asked, chained to a stored
response, run in the background, fetched, deleted or cancelled."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any

from vllm_gateway.gateway.core.admission import Admission
from vllm_gateway.gateway.core.calls import Call, CallRun, Wire
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.generate import chat_generate, check_model
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.responses import convert
from vllm_gateway.gateway.responses.formatting import ResponsesFormatter, now
from vllm_gateway.gateway.responses.schemas import (
    DeletedResponse,
    ErrorEvent,
    Response,
    ResponseError,
    ResponsesRequest,
)
from vllm_gateway.gateway.responses.store import ResponseStore

log = logging.getLogger("gateway.responses")


def _event(obj: Any) -> bytes:
    return b"event: " + type(obj).__struct_config__.tag.encode() + b"\ndata: " + json_encode(obj) + b"\n\n"


def _error(e: APIError) -> bytes:
    return _event(ErrorEvent(message=e.message, code=str(e.code) if e.code is not None else e.type, param=e.param))


# Typed events (`event:` and `data:` lines), no `[DONE]`, as OpenAI streams them.
RESPONSES_WIRE = Wire(event=_event, done=b"", error=_error)


@dataclasses.dataclass
class Prepared:
    call: Call
    fmt: ResponsesFormatter
    conversation: list[dict[str, Any]]


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found (responses are kept per gateway, "
                         "for RESPONSES_STORE_TTL_S)", param="response_id", code="response_not_found")


def prepare(req: ResponsesRequest, model: str, store: ResponseStore, owner: str | None = None) -> Prepared:
    check_model(req.model, model)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id, owner)
        if previous is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found",
                           param="previous_response_id", code="previous_response_not_found")
        history = previous.conversation + convert.output_messages(previous.response.output)
    if req.background and not req.store:
        raise APIError(400, "background responses must be stored (store: true)", param="background")
    gen = chat_generate(convert.chat_request(req, history), f"resp-{uuid.uuid4().hex}")
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
    call = Call([gen], fmt, "input", req.stream and not req.background, closing=fmt.closing, opening=fmt.opening,
                wire=RESPONSES_WIRE)
    prepared = Prepared(call, fmt, history + convert.input_messages(req.input))
    if req.store:
        fmt.on_final = lambda r: store.put(r, prepared.conversation, owner)
    return prepared


def start_background(client: EngineClient, prepared: Prepared, store: ResponseStore, timeout_s: float,
                     owner: str | None = None, admission: Admission | None = None) -> Response:
    """Run the response without the client; it is stored now as `queued` and
    updated as it goes (GET shows it, POST .../cancel stops it). However it ends
    (done, failed at any step, cancelled, the gateway stopping), it ends in the
    store with that status: accepted work is never silently lost."""
    queued = prepared.fmt.snapshot("queued")
    stored = store.put(queued, prepared.conversation, owner)
    fmt = prepared.fmt

    def failed(code: str, message: str) -> None:
        stored.response = fmt.snapshot("failed")
        stored.response.error = ResponseError(code, message)
        store.put(stored.response, stored.conversation, owner)

    async def run() -> None:
        stored.response = fmt.snapshot("in_progress")
        r: CallRun | None = None
        if admission is not None:
            admission.enter()  # accepted work: counted against the cap while it runs
        try:
            r = CallRun(client, prepared.call, timeout_s)
            await r.start()
            await r.collect()  # the formatter stores the final response
        except asyncio.CancelledError:
            if r is not None:
                r.close()
            if stored.interrupted is not None:  # not the client's cancel: the gateway is stopping
                failed("server_error", stored.interrupted)
            else:
                stored.response = fmt.snapshot("cancelled")
                store.put(stored.response, stored.conversation, owner)
        except APIError as e:
            failed(str(e.code or e.type), e.message)
        except Exception as e:  # a fault of ours: the response says so, the log has the rest
            log.exception("background response %s failed", stored.response.id)
            failed("server_error", f"internal gateway error: {type(e).__name__}")
        finally:
            if admission is not None:
                admission.leave()

    stored.task = asyncio.get_running_loop().create_task(run())
    return queued


async def fail_running(store: ResponseStore, why: str) -> int:
    """The gateway stops: background responses still running end `failed`,
    saying why, instead of vanishing with the process."""
    running = store.running()
    for stored in running:
        stored.interrupted = why
        assert stored.task is not None
        stored.task.cancel()
    if running:
        await asyncio.wait([s.task for s in running if s.task is not None], timeout=5)
    return len(running)


def fetch(store: ResponseStore, response_id: str, owner: str | None = None) -> Response:
    stored = store.get(response_id, owner)
    if stored is None:
        raise not_found(response_id)
    return stored.response


def delete(store: ResponseStore, response_id: str, owner: str | None = None) -> DeletedResponse:
    if not store.delete(response_id, owner):
        raise not_found(response_id)
    return DeletedResponse(response_id)


async def cancel(store: ResponseStore, response_id: str, owner: str | None = None) -> Response:
    stored = store.get(response_id, owner)
    if stored is None:
        raise not_found(response_id)
    if not stored.response.background:
        raise APIError(400, "only background responses can be cancelled", param="response_id")
    task = stored.task
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task])  # however it ended, it is in the store now
    return (store.get(response_id, owner) or stored).response
