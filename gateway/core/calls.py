"""One call to the engines, whichever API and intake it came from.

An intake's handler validates a decoded request and builds a `Call`: the engine
messages, the formatter that shapes the answer, and how its stream is written
(`Wire`). `CallRun` submits it to an engine and yields the answer as batches of
stream objects or as one response object; `ask` is the one-answer kind (tokens,
embeddings, adapters). Every failure surfaces as an `APIError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from vllm_gateway.gateway.core.answer import Book
from vllm_gateway.gateway.core.errors import APIError, from_failure
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.engines.client import EngineClient, NoEngine, Unencodable
from vllm_gateway.gateway.engines.streams import OneAnswer, RequestStream, StreamFailed
from vllm_gateway.gateway.metrics import TTFT
from vllm_gateway.protocol.messages import Delta, EngineStatus, Generate

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: object) -> bytes:
    """One server-sent event of a JSON object, as OpenAI streams them."""
    return b"data: " + json_encode(obj) + b"\n\n"


class Formatter(Protocol):
    """What a call needs of a formatter: engine deltas in, the API's objects
    out. Formatters only format: whether the request is finished is its stream's."""

    book: Book

    def chunks(self, deltas: list[Delta]) -> list[Any]:
        """The stream objects for one batch of deltas."""

    def add(self, deltas: list[Delta]) -> None:
        """Accumulate a batch for the whole (non-streaming) answer."""

    def response(self) -> Any:
        """The whole answer, once every delta was added."""


@dataclasses.dataclass(frozen=True)
class Wire:
    """How an API streams: one server-sent event per object, what ends a stream,
    and how a failure mid-stream is told."""

    event: Callable[[object], bytes] = sse
    done: bytes = SSE_DONE
    error: Callable[[APIError], bytes] = APIError.sse_event


OPENAI_WIRE = Wire()


@dataclasses.dataclass
class Call:
    gens: list[Generate]
    fmt: Formatter
    prompt_param: str  # the request field an engine-side prompt error is about
    stream: bool
    closing: Callable[[], list[object]] | None = None  # the last events of a stream (usage, when asked for)
    # The first events of a stream, if any, given the engine's first output.
    opening: Callable[[list[Delta]], list[object]] | None = None
    exact: bool = False  # engine batches kept as they are, not merged per choice (RunPod's standard mode)
    wire: Wire = OPENAI_WIRE
    # Awaited once the whole answer is made, before its end is sent (a stored
    # response is stored then, so that a follow-up finds it); its APIError is the client's.
    finish: Callable[[], Awaitable[None]] | None = None


@dataclasses.dataclass
class EventStream:
    """A stream of objects made elsewhere (a stored response's events, replayed),
    written as `wire` writes a call's stream."""

    batches: AsyncIterator[list[object]]
    wire: Wire = OPENAI_WIRE


def no_engine() -> APIError:
    return APIError(503, "no engine is ready; retry shortly", type="service_unavailable_error")


def ready_engine(client: EngineClient) -> EngineStatus:
    """The status of a ready engine, or a 503."""
    status = client.ready_status()
    if status is None:
        raise no_engine()
    return status


@dataclasses.dataclass(frozen=True)
class Target:
    """The model a request is served by, as the routing found it."""

    model: str  # the name answered with and sent to the engine (a LoRA adapter's, say)
    max_model_len: int
    task: str


def target(client: EngineClient, requested: str | None, task: str | None = "generate") -> Target:
    """The served model a request names (or, naming none, the first of its task;
    `task` None: any task); a 404 naming the served ones when no ready engine
    serves it."""
    served = client.served_models()
    if not served:
        raise no_engine()
    if requested is None:
        found = next((m for m in served if task in (None, m.task) and m.parent is None), None)
        if found is None:
            raise APIError(400, f"no model here serves {task}; served: " + ", ".join(
                f"{m.name} ({m.task})" for m in served), param="model")
    else:
        found = next((m for m in served if m.name == requested), None)
        if found is None:
            raise APIError(404, f"The model `{requested}` does not exist. Served: "
                           + ", ".join(m.name for m in served) + ".", param="model", code="model_not_found")
        if task is not None and found.task != task:
            use = "/v1/embeddings" if found.task == "embed" else "a generation route"
            raise APIError(400, f"The model `{requested}` is an {found.task} model: use {use}", param="model")
    status = client.ready_status(found.name)
    return Target(found.name, found.max_model_len or (status.max_model_len if status else 0), found.task)


def out_of_range(e: Unencodable, param: str) -> APIError:
    return APIError(400, f"the request holds a value out of range ({e})", param=param)


async def ask(client: EngineClient, msg: OneAnswer, param: str, model: str | None = None,
              timeout_s: float = 30.0) -> Any:
    """One answer from an engine serving `model`; its failure as the client's error."""
    try:
        return await client.ask(msg, model, timeout_s)
    except NoEngine:
        raise no_engine() from None
    except Unencodable as e:
        raise out_of_range(e, param) from None
    except StreamFailed as e:
        raise from_failure(e.failure, param) from None


def submit(client: EngineClient, call: Call) -> RequestStream:
    try:
        return client.submit(call.gens, call.exact)
    except NoEngine:
        raise no_engine() from None
    except Unencodable as e:
        raise out_of_range(e, call.prompt_param) from None


class ClientGone(Exception):
    """The client went away; nothing more is sent."""


class CallRun:
    """A call submitted to an engine. `start()` waits for the engine to accept it
    (its first output), so that a request the engine rejects fails before any
    stream begins. Whatever way the run ends, `close()` frees the engine slots;
    it is called by `collect()` and at the end of a stream, and is safe to repeat.

    A stream is read with `next_batch()` (a plain coroutine per batch: this is
    the path every streamed token takes) or `batches()`."""

    def __init__(self, client: EngineClient, call: Call, timeout_s: float = 0, stream_interval_s: float = 0) -> None:
        self.client = client
        self.call = call
        self.stream_interval_s = stream_interval_s
        self.timeout_s = timeout_s
        self.submitted = time.monotonic()
        self.rs = submit(client, call)
        # One timer for the whole request, not a timeout around every engine step.
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire) if timeout_s > 0 else None
        self._first: list[Delta] | None = None  # the engine's first output, until streamed
        self._closing_due = call.closing is not None or call.finish is not None
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            self.client.release(self.rs, abort=not self.rs.finished)

    def _expire(self) -> None:
        self.rs.interrupt(APIError(
            504, f"the request took longer than REQUEST_TIMEOUT_S={self.timeout_s:g} s and was stopped",
            type="timeout_error", code="request_timeout"))

    def client_gone(self) -> None:
        """The client disconnected: the stream ends with `ClientGone`."""
        self.rs.interrupt(ClientGone())

    async def _next(self) -> list[Delta] | None:
        try:
            return await self.rs.next()
        except StreamFailed as e:
            raise from_failure(e.failure, self.call.prompt_param) from None

    async def start(self) -> None:
        try:
            self._first = await self._next() or []
            TTFT.observe(time.monotonic() - self.submitted)
        except BaseException:
            self.close()
            raise

    async def collect(self) -> object:
        """The whole response object (non-streaming)."""
        fmt = self.call.fmt
        try:
            fmt.add(self._first or [])
            while (batch := await self._next()) is not None:
                fmt.add(batch)
        finally:
            self.close()
        answer = fmt.response()
        if self.call.finish is not None:
            await self.call.finish()
        return answer

    async def next_batch(self) -> list[object] | None:
        """The stream objects of the next engine output batch (the opening ones
        with the first, the closing ones last); None at the end. The wire's end
        marker (`[DONE]`) is the caller's to add."""
        fmt = self.call.fmt
        first = self._first
        if first is not None:
            self._first = None
            opening = self.call.opening(first) if self.call.opening is not None else []
            return opening + fmt.chunks(first)
        if not self.rs.finished or self.rs.pending:
            if self.stream_interval_s:
                # Stream batching: at most one write per interval; what the
                # engine produced meanwhile goes out merged, one chunk per choice.
                await asyncio.sleep(self.stream_interval_s)
            batch = await self._next()
            if batch is not None:
                return fmt.chunks(batch)
        if self._closing_due:
            self._closing_due = False
            closing = self.call.closing() if self.call.closing is not None else []
            if self.call.finish is not None:
                await self.call.finish()
            return closing
        return None

    async def batches(self) -> AsyncIterator[list[object]]:
        """`next_batch()` as an async iterator; closes the run when it ends."""
        try:
            while (chunks := await self.next_batch()) is not None:
                yield chunks
        finally:
            self.close()
