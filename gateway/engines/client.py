"""The gateway's side of the engine protocol: sockets, routing, request streams.

One DEALER socket per engine. A heartbeat (`Hello`) goes to every engine every
`HEARTBEAT_S` and is answered with an `EngineStatus`, which says whether the engine
is ready and how loaded it is; a busy engine also pushes one every 100 ms. New
requests go to the least-loaded ready engine. An engine whose connection drops (its
process died), that stops answering for `ENGINE_TIMEOUT_S`, or that answers as a
new instance (it was restarted) fails all the requests it had in flight with a 503
and leaves routing until it is ready again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Union

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from vllm_gateway.protocol.messages import (
    Abort,
    EngineMetrics,
    Delta,
    Detokenize,
    Done,
    Embed,
    Embeddings,
    LoadAdapter,
    ModelInfo,
    Tokenize,
    Tokens,
    UnloadAdapter,
    ToolCallDelta,
    PROTOCOL_VERSION,
    EngineStatus,
    FailureKind,
    Generate,
    Hello,
    Outputs,
    RequestFailed,
    TokenLogprob,
    decode_engine_message,
    encode,
)
from vllm_gateway.gateway.config import RoutingSettings
from vllm_gateway.gateway.engines.routing import Balance, PrefixRecord, Router
from vllm_gateway.gateway.openai.schemas import EngineHealth
from vllm_gateway.protocol.transport import secure_client

log = logging.getLogger("gateway.engines")

HEARTBEAT_S = 0.5


def merge(deltas: list[Delta]) -> list[Delta]:
    """One delta per (request, choice), in order of first appearance."""
    if len(deltas) < 2:
        return deltas
    groups: dict[tuple[str, int], list[Delta]] = {}
    for d in deltas:
        key = (d.request_id, d.index)
        group = groups.get(key)
        if group is None:
            groups[key] = [d]
        else:
            group.append(d)
    if len(groups) == len(deltas):
        return deltas
    return [g[0] if len(g) == 1 else _joined(g) for g in groups.values()]


def _joined(group: list[Delta]) -> Delta:
    """Consecutive deltas of one choice as one (texts and tokens joined once;
    reasoning joined; tool-call pieces joined per tool call)."""
    first, last = group[0], group[-1]
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    reasoning: list[str] = []
    calls: list[ToolCallDelta] | None = None
    for d in group:
        token_ids += d.token_ids
        if d.logprobs is not None:
            logprobs = (logprobs or []) + d.logprobs
        if d.reasoning:
            reasoning.append(d.reasoning)
        if d.tool_calls:
            calls = join_tool_calls(calls or [], d.tool_calls)
    return Delta(
        first.request_id, first.index, "".join([d.text for d in group]), token_ids,
        last.num_prompt_tokens, last.finish_reason, last.stop_reason, logprobs,
        first.prompt_text, first.prompt_token_ids, first.prompt_logprobs,
        "".join(reasoning) or None, calls, last.reasoning_tokens,
    )


def join_tool_calls(into: list[ToolCallDelta], pieces: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Tool-call pieces added to `into` (a new list): pieces of a tool call
    already there extend it (its id and name kept, arguments appended), others
    are added, in order of index. What a client reassembles is unchanged."""
    out = {c.index: ToolCallDelta(c.index, c.id, c.name, c.arguments) for c in into}
    for p in pieces:
        have = out.get(p.index)
        if have is None:
            out[p.index] = ToolCallDelta(p.index, p.id, p.name, p.arguments)
        else:
            have.id = have.id or p.id
            have.name = have.name or p.name
            have.arguments += p.arguments
    return [out[i] for i in sorted(out)]


class RequestStream:
    """What one client request receives from its engine request(s), and the one
    owner of whether it is finished (every choice of every engine request ended).

    Read with `async for batch in stream` (or `await stream.next()`, None at the
    end): each batch is what arrived since the last, so a lagging reader catches up
    in one go, merged to one delta per choice unless the stream keeps `exact`
    batches (RunPod's standard mode cuts batches at token counts). A failure is
    raised after the output that came before it: the engine's (`StreamFailed`), or
    whatever `interrupt()` was given (a timeout, a client gone), at once."""

    __slots__ = ("request_ids", "engine", "exact", "_unfinished", "_items", "_waiter", "error")

    def __init__(self, request_ids: list[str], n: int, engine: "EngineConnection | None", exact: bool = False) -> None:
        self.request_ids = request_ids
        self.engine = engine
        self.exact = exact
        self._unfinished = len(request_ids) * n  # choices not yet ended
        self._items: list[Delta] = []
        self._waiter: asyncio.Future | None = None
        self.error: Exception | None = None

    @property
    def finished(self) -> bool:
        """Every choice has ended (its last output may still be unread)."""
        return self._unfinished <= 0

    @property
    def pending(self) -> bool:
        """Output has arrived that was not read yet."""
        return bool(self._items)

    def push(self, delta: Delta) -> None:
        if self.error is None:
            self._items.append(delta)
            if delta.finish_reason is not None:
                self._unfinished -= 1
            self._wake()

    def fail(self, failure: RequestFailed) -> None:
        """The engine's failure: what it produced before still comes out first."""
        self._end(StreamFailed(failure))

    def interrupt(self, error: Exception) -> None:
        """End the stream with `error` now (a timeout, a client gone), dropping
        output not yet taken."""
        self._items = []
        self._end(error)

    def _end(self, error: Exception) -> None:
        if self.error is None:  # the first error wins
            self.error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> list[Delta] | None:
        """The next batch; None once finished and read to the end."""
        while not self._items:
            if self.error is not None:
                raise self.error
            if self._unfinished <= 0:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        items, self._items = self._items, []
        return items if self.exact else merge(items)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> list[Delta]:
        batch = await self.next()
        if batch is None:
            raise StopAsyncIteration
        return batch


OneAnswer = Union[Tokenize, Detokenize, Embed, LoadAdapter, UnloadAdapter]


class Reply:
    """The one answer an engine gives to a `OneAnswer` request."""

    __slots__ = ("engine", "_future")

    def __init__(self, engine: "EngineConnection") -> None:
        self.engine = engine
        self._future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._future.done()

    def resolve(self, answer: Any) -> None:
        if not self._future.done():
            self._future.set_result(answer)

    def fail(self, failure: RequestFailed) -> None:
        if not self._future.done():
            self._future.set_exception(StreamFailed(failure))

    async def wait(self, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout_s)
        except asyncio.TimeoutError:
            raise StreamFailed(RequestFailed("", FailureKind.ENGINE_UNAVAILABLE,
                                             f"the engine did not answer within {timeout_s:g} s")) from None


class StreamFailed(Exception):
    def __init__(self, failure: RequestFailed) -> None:
        super().__init__(failure.message)
        self.failure = failure


class EngineConnection:
    def __init__(self, endpoint: str, ctx: zmq.asyncio.Context, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s  # silent this long: considered gone
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock)
        # Connection events: a dropped connection is how a dead engine shows first.
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.status: EngineStatus | None = None
        self.last_seen = 0.0
        # Requests in flight on this engine: streams, and the one-answer requests.
        self.streams: dict[str, RequestStream | Reply] = {}
        # Requests sent since the engine's last report: counted in routing so a
        # burst spreads over engines before their reports catch up.
        self.unreported = 0
        self.routed = 0  # requests sent to this engine, ever
        self.choices: dict[str, int] = {}  # routing decisions that chose it, by reason
        self.record = PrefixRecord()  # what its KV cache likely holds (routing)
        self.metrics: EngineMetrics | None = None  # the engine's latest report
        self.incompatible = ""  # the instance of an engine of another protocol version, logged once

    @property
    def ready(self) -> bool:
        return (
            self.status is not None
            and self.status.state == "ready"
            and time.monotonic() - self.last_seen < self.timeout_s
        )

    def models(self) -> list[ModelInfo]:
        s = self.status
        if s is None:
            return []
        # An engine of before model reports serves its one model.
        return s.models or [ModelInfo(s.model, max_model_len=s.max_model_len)]

    def serves(self, model: str) -> bool:
        return any(m.name == model for m in self.models())

    @property
    def load(self) -> float:
        s = self.status
        assert s is not None
        return s.running + s.waiting + self.unreported + s.kv_cache_usage

    def send(self, msg: object) -> None:
        self.sock.send(encode(msg), copy=False)


class EngineClient:
    def __init__(self, endpoints: Iterable[str], gateway_id: str | None = None, engine_timeout_s: float = 5.0,
                 routing: RoutingSettings | None = None) -> None:
        self.gateway_id = gateway_id or f"gw-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ctx = zmq.asyncio.Context()
        self.engines = [EngineConnection(ep, self.ctx, engine_timeout_s) for ep in endpoints]
        routing = routing or RoutingSettings()
        self.router = Router(routing.policy, Balance(routing.balance_abs, routing.balance_rel))  # type: ignore[arg-type]
        if not self.engines:
            raise ValueError("no engine endpoints given")
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop(e)) for e in self.engines]
        self._tasks += [asyncio.create_task(self._monitor_loop(e)) for e in self.engines]
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for e in self.engines:
            for s in list(e.streams.values()):
                s.fail(RequestFailed("", FailureKind.ENGINE_UNAVAILABLE, "the gateway is shutting down"))
            e.sock.disable_monitor()
            e.monitor.close(0)
            e.sock.close(0)
        self.ctx.term()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Until some engine is ready now (one may be restarting); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --------------------------------------------------------------------- status

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.engines)

    @property
    def in_flight(self) -> int:
        """Engine requests sent and not yet finished, over all engines."""
        return sum(len(e.streams) for e in self.engines)

    def describe(self) -> list[EngineHealth]:
        """Each engine's state, for /health."""
        out = []
        for e in self.engines:
            s = e.status
            out.append(EngineHealth(
                endpoint=e.endpoint, ready=e.ready, state=s.state if s else "unreachable",
                engine_id=s.engine_id if s else None, pid=s.pid if s else None,
                running=s.running if s else 0, waiting=s.waiting if s else 0,
                kv_cache_usage=s.kv_cache_usage if s else 0.0, in_flight=len(e.streams), routed=e.routed,
            ))
        return out

    def ready_status(self, model: str | None = None) -> EngineStatus | None:
        """The status of a ready engine (serving `model`, when given)."""
        for e in self.engines:
            if e.ready and (model is None or e.serves(model)):
                return e.status
        return None

    def served_models(self) -> list[ModelInfo]:
        """Every model the ready engines serve, once each, in engine order."""
        seen: dict[str, ModelInfo] = {}
        for e in self.engines:
            if e.ready:
                for m in e.models():
                    seen.setdefault(m.name, m)
        return list(seen.values())

    # ------------------------------------------------------------------- requests

    def submit(self, requests: list[Generate], exact: bool = False) -> RequestStream:
        """Send these requests (the prompts of one client request) to one engine
        serving their model; `exact`: the stream keeps the engine's batches as
        they are (see RequestStream)."""
        ready = self._ready(requests[0].model or None)
        if not ready:
            raise NoEngine()
        engine, why = self.router.pick(ready, requests)
        engine.choices[why] = engine.choices.get(why, 0) + 1
        try:  # before anything is sent: a value msgpack cannot carry fails the whole request
            frames = [encode(r) for r in requests]
        except (OverflowError, TypeError, ValueError) as e:
            raise Unencodable(str(e)) from None
        stream = RequestStream([r.request_id for r in requests], requests[0].params.n, engine, exact)
        for r, frame in zip(requests, frames):
            engine.streams[r.request_id] = stream
            engine.sock.send(frame, copy=False)
        engine.unreported += len(requests)
        engine.routed += len(requests)
        return stream

    async def ask(self, msg: OneAnswer, model: str | None = None, timeout_s: float = 30.0) -> Any:
        """Send a one-answer request to the least-loaded ready engine serving
        `model` and wait for its answer; a failure raises `StreamFailed`, no
        engine `NoEngine`."""
        engine = self._pick(model)
        if engine is None:
            raise NoEngine()
        return await self._ask(engine, msg, timeout_s)

    async def ask_all(self, make: Callable[[], OneAnswer], model: str, timeout_s: float = 120.0) -> list[Any]:
        """The same request to every ready engine serving `model` (LoRA adapters
        are loaded on each); their answers, or the first failure."""
        engines = self._ready(model)
        if not engines:
            raise NoEngine()
        return list(await asyncio.gather(*(self._ask(e, make(), timeout_s) for e in engines)))

    async def _ask(self, engine: "EngineConnection", msg: OneAnswer, timeout_s: float) -> Any:
        try:
            frame = encode(msg)
        except (OverflowError, TypeError, ValueError) as e:
            raise Unencodable(str(e)) from None
        reply = Reply(engine)
        engine.streams[msg.request_id] = reply
        engine.sock.send(frame, copy=False)
        try:
            return await reply.wait(timeout_s)
        finally:
            # Given up on (the client left, or it took too long): the engine stops it too.
            if engine.streams.pop(msg.request_id, None) is not None and not reply.done:
                engine.send(Abort([msg.request_id]))

    def release(self, stream: RequestStream, *, abort: bool) -> None:
        """Forget a client request; with `abort`, also free its engine slots now
        (the client went away, or the request failed part way)."""
        live = [rid for rid in stream.request_ids if stream.engine.streams.pop(rid, None) is not None]
        if live and abort:
            stream.engine.send(Abort(live))

    def _ready(self, model: str | None = None) -> list[EngineConnection]:
        """The ready engines (serving `model`, when given)."""
        return [e for e in self.engines if e.ready and (model is None or e.serves(model))]

    def _pick(self, model: str | None = None) -> EngineConnection | None:
        """The least-loaded ready engine (serving `model`, when given)."""
        ready = self._ready(model)
        if not ready:
            return None
        return min(ready, key=lambda e: e.load)

    # ------------------------------------------------------------------ receiving

    async def _recv_loop(self, engine: EngineConnection) -> None:
        while True:
            payload = await engine.sock.recv(copy=False)
            try:
                msg = decode_engine_message(payload.buffer)
            except Exception as e:
                log.warning("undecodable message from engine %s: %s", engine.endpoint, e)
                continue
            if isinstance(msg, Outputs):
                self._dispatch(engine, msg.deltas)
            elif isinstance(msg, EngineStatus):
                self._on_status(engine, msg)
            elif isinstance(msg, EngineMetrics):
                engine.metrics = msg
            elif isinstance(msg, (Tokens, Embeddings, Done)):
                reply = engine.streams.pop(msg.request_id, None)
                if isinstance(reply, Reply):
                    reply.resolve(msg)
            elif isinstance(msg, RequestFailed):
                stream = engine.streams.pop(msg.request_id, None)
                if stream is not None:
                    stream.fail(msg)

    def _dispatch(self, engine: EngineConnection, deltas: list[Delta]) -> None:
        streams = engine.streams
        for d in deltas:
            stream = streams.get(d.request_id)
            if stream is None or isinstance(stream, Reply):
                continue  # aborted by us; late output
            stream.push(d)

    def _on_status(self, engine: EngineConnection, status: EngineStatus) -> None:
        if status.protocol_version != PROTOCOL_VERSION:
            if engine.incompatible != status.instance:
                engine.incompatible = status.instance
                log.error("engine %s at %s speaks protocol version %d, this gateway %d: not routing to it "
                          "(run the same vllm-gateway version on both)", status.engine_id, engine.endpoint,
                          status.protocol_version, PROTOCOL_VERSION)
            engine.status = None
            return
        previous = engine.status
        if previous is not None and previous.instance != status.instance:
            self._fail_all(engine, "the engine restarted; the request was lost")
            engine.record.clear()  # a new process: its KV cache is empty
        if previous is None or previous.kv_cache_tokens != status.kv_cache_tokens:
            engine.record.resize(status.kv_cache_tokens)
        if status.state != "ready" and engine.streams:
            self._fail_all(engine, f"the engine is {status.state}")
        if previous is None or previous.state != status.state or previous.instance != status.instance:
            log.info("engine %s at %s is %s (model %s)", status.engine_id, engine.endpoint, status.state, status.model)
        engine.status = status
        engine.last_seen = time.monotonic()
        engine.unreported = 0

    def _fail_all(self, engine: EngineConnection, why: str) -> None:
        streams, engine.streams = engine.streams, {}
        for rid, stream in streams.items():
            stream.fail(RequestFailed(rid, FailureKind.ENGINE_UNAVAILABLE, why))

    async def _monitor_loop(self, engine: EngineConnection) -> None:
        while True:
            event = parse_monitor_message(await engine.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED and engine.status is not None:
                log.error("lost the connection to engine %s at %s; failing its %d request(s)",
                          engine.status.engine_id, engine.endpoint, len(engine.streams))
                engine.status = None  # out of routing until it answers again
                self._fail_all(engine, "the engine went away (its process exited or the connection dropped)")

    async def _heartbeat_loop(self) -> None:
        hello = Hello(self.gateway_id, PROTOCOL_VERSION)
        while True:
            now = time.monotonic()
            for e in self.engines:
                if e.status is not None and e.streams and now - e.last_seen > e.timeout_s:
                    log.error("engine at %s stopped answering; failing its %d request(s)", e.endpoint, len(e.streams))
                    self._fail_all(e, "the engine stopped answering")
                e.send(hello)
            await asyncio.sleep(HEARTBEAT_S)


class NoEngine(Exception):
    """No engine is ready to take a request."""


class Unencodable(Exception):
    """A request holds a value the wire cannot carry (an integer beyond 64 bits
    in a free-form field)."""
