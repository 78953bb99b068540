"""The gateway's side of the engine protocol: sockets, heartbeats, engine states.

One DEALER socket per engine. A heartbeat (`Hello`) goes to every engine every
`HEARTBEAT_S` and is answered with an `EngineStatus`, which says whether the engine
is ready and how loaded it is; a busy engine also pushes one every 100 ms. New
requests go where the router (engines/routing.py) sends them. An engine whose
connection drops (its process died), that stops answering for `ENGINE_TIMEOUT_S`,
or that answers as a new instance (it was restarted) fails all the requests it had
in flight and leaves routing until it is ready again. What callers see of the
engines is neutral: `EngineState`s, `ModelInfo`s, request streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from vllm_gateway.gateway.engines.routing import PrefixRecord, Router
from vllm_gateway.gateway.engines.streams import OneAnswer, Reply, RequestStream
from vllm_gateway.protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Delta,
    Done,
    EngineMetrics,
    EngineStatus,
    Embeddings,
    FailureKind,
    Generate,
    Hello,
    ModelInfo,
    Outputs,
    RequestFailed,
    Tokens,
    decode_engine_message,
    encode,
)
from vllm_gateway.protocol.transport import secure_client

log = logging.getLogger("gateway.engines")

HEARTBEAT_S = 0.5


class EngineState(msgspec.Struct):
    """One engine as a gateway sees it (/health lists them)."""

    endpoint: str
    ready: bool
    state: str  # loading, ready, failed, stopping, or unreachable
    engine_id: str | None
    pid: int | None
    running: int
    waiting: int
    kv_cache_usage: float
    in_flight: int  # this gateway's requests on the engine now
    routed: int  # this gateway's requests sent to the engine, ever


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
                 router: Router | None = None) -> None:
        self.gateway_id = gateway_id or f"gw-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ctx = zmq.asyncio.Context()
        self.engines = [EngineConnection(ep, self.ctx, engine_timeout_s) for ep in endpoints]
        self.router = router or Router("prefix")
        # What each engine message does (one handler per message type).
        self._handlers: dict[type, Callable[[EngineConnection, Any], None]] = {
            Outputs: lambda engine, msg: self._dispatch(engine, msg.deltas),
            EngineStatus: self._on_status,
            EngineMetrics: self._on_metrics,
            Tokens: self._on_answer,
            Embeddings: self._on_answer,
            Done: self._on_answer,
            RequestFailed: self._on_failed,
        }
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

    def describe(self) -> list[EngineState]:
        """Each engine's state, for /health."""
        out = []
        for e in self.engines:
            s = e.status
            out.append(EngineState(
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
            handler = self._handlers.get(type(msg))
            if handler is not None:
                handler(engine, msg)

    @staticmethod
    def _on_metrics(engine: EngineConnection, msg: EngineMetrics) -> None:
        engine.metrics = msg

    @staticmethod
    def _on_answer(engine: EngineConnection, msg: Tokens | Embeddings | Done) -> None:
        reply = engine.streams.pop(msg.request_id, None)
        if isinstance(reply, Reply):
            reply.resolve(msg)

    @staticmethod
    def _on_failed(engine: EngineConnection, msg: RequestFailed) -> None:
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

