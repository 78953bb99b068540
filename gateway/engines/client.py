"""The gateway's side of the engine protocol: sockets, heartbeats, engine states.

One DEALER socket per engine. A heartbeat (`Hello`) goes to every engine every
`HEARTBEAT_S` and is answered with an `EngineStatus`, which says whether the engine
is ready and how loaded it is; a busy engine also pushes one every 100 ms. New
requests go where the router (engines/routing.py) sends them. An engine whose
connection drops (its process died), that stops answering for `ENGINE_TIMEOUT_S`,
or that answers as a new instance (it was restarted) fails all the requests it had
in flight and leaves routing until it is ready again. What callers see of the
engines is neutral: `EngineSummary`s, `ModelInfo`s, request streams.
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
    LoadAdapter,
    ModelInfo,
    Outputs,
    RequestFailed,
    Tokens,
    UnloadAdapter,
    decode_engine_message,
    encode,
)
from vllm_gateway.protocol.transport import secure_client

log = logging.getLogger("gateway.engines")

HEARTBEAT_S = 0.5

# A failed CURVE handshake: the engine's key is wrong, or it does not authorize ours.
_HANDSHAKE_ERRORS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "CURVE handshake refused: the engine does not authorize this gateway's key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "CURVE handshake failed: a protocol error (a wrong engine key, or an engine "
                                         "without CURVE)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake with the engine failed",
}
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class EngineSummary(msgspec.Struct):
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
    error: str | None = None  # why it cannot be reached (a failed security handshake)
    models: list[str] = []  # what it serves: its model and LoRA adapters


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
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        self.sock.connect(endpoint)
        self.status: EngineStatus | None = None
        self.last_seen = 0.0
        # Requests in flight on this engine: streams, and the one-answer requests.
        self.streams: dict[str, RequestStream | Reply] = {}
        self.routed = 0  # requests sent to this engine, ever
        self.choices: dict[str, int] = {}  # routing decisions that chose it, by reason
        self.record = PrefixRecord()  # what its KV cache likely holds (routing)
        self.metrics: EngineMetrics | None = None  # the engine's latest report
        self.incompatible = ""  # the instance of an engine of another protocol version, logged once
        self.replayed: set[str] = set()  # run-time adapters sent to this engine life
        self.error: str | None = None  # why it cannot be reached (a failed CURVE handshake), until it answers
        self.silent = False  # judged silent (out of routing), until it answers

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
    def generating(self) -> int:
        """This gateway's generations on the engine now, n each: sent and not yet
        ended, as only the gateway knows between two reports (those sent since
        the last are on their way; those that ended since are gone)."""
        return sum(s.n for s in self.streams.values() if isinstance(s, RequestStream) and not s.finished)

    @property
    def load(self) -> int:
        """Requests on the engine: other gateways' as of its latest report, and
        this gateway's now."""
        return sum(self.requests_now())

    def requests_now(self) -> tuple[int, int]:
        """Running and waiting as vLLM counts them (its latest report), with
        what only this gateway knows since: its requests sent since wait (none
        was scheduled as far as it knows), and those ended since are gone, off
        running first (a finished request was running). A router reading a
        scrape just after a burst sees the burst, not the report before it."""
        s = self.status
        assert s is not None
        mine = self.generating
        total = max(0, s.running + s.waiting - s.in_engine) + mine
        waiting = min(total, s.waiting + max(0, mine - s.in_engine))
        return total - waiting, waiting

    @property
    def kv_cache_usage(self) -> float:
        """Its KV cache's use as of its latest report: breaks ties of load, never
        weighs against a margin counted in requests."""
        s = self.status
        return s.kv_cache_usage if s is not None else 0.0

    def send(self, msg: object) -> None:
        self.sock.send(encode(msg), copy=False)


class EngineClient:
    def __init__(self, endpoints: Iterable[str], gateway_id: str | None = None, engine_timeout_s: float = 5.0,
                 router: Router | None = None) -> None:
        self.gateway_id = gateway_id or f"gw-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ctx = zmq.asyncio.Context()
        self.engines = [EngineConnection(ep, self.ctx, engine_timeout_s) for ep in endpoints]
        self.router = router or Router("prefix")
        # LoRA adapters loaded at run time through this gateway: name -> (base model, path).
        self.adapters: dict[str, tuple[str, str]] = {}
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

    def describe(self) -> list[EngineSummary]:
        """Each engine's state, for /health."""
        out = []
        for e in self.engines:
            s = e.status
            out.append(EngineSummary(
                endpoint=e.endpoint, ready=e.ready, state=s.state if s else "unreachable",
                engine_id=s.engine_id if s else None, pid=s.pid if s else None,
                running=s.running if s else 0, waiting=s.waiting if s else 0,
                kv_cache_usage=s.kv_cache_usage if s else 0.0, in_flight=len(e.streams), routed=e.routed, error=e.error,
                models=[m.name for m in e.models()],
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
        engine, why, key_bytes = self.router.pick(ready, requests)
        engine.choices[why] = engine.choices.get(why, 0) + 1
        try:  # before anything is sent: a value msgpack cannot carry fails the whole request
            frames = [encode(r) for r in requests]
        except (OverflowError, TypeError, ValueError) as e:
            raise Unencodable(str(e)) from None
        stream = RequestStream([r.request_id for r in requests], requests[0].params.n, engine, exact, key_bytes)
        for r, frame in zip(requests, frames):
            engine.streams[r.request_id] = stream
            engine.sock.send(frame, copy=False)
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

    async def load_adapter(self, name: str, path: str, base: str, timeout_s: float = 120.0) -> str:
        """Load a LoRA adapter on every ready engine of `base`, all or none: if
        one refuses, it is unloaded from those that took it, and the refusal
        raised. Kept, so that an engine that restarts or joins gets it again
        before it is routed requests for it."""
        engines = self._ready(base)
        if not engines:
            raise NoEngine()
        results = await self._ask_each(engines, lambda: LoadAdapter(_rid("lora"), name, path), timeout_s)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            took = [e for e, r in zip(engines, results) if not isinstance(r, BaseException)]
            await self._ask_each(took, lambda: UnloadAdapter(_rid("lora"), name), timeout_s)
            raise failures[0]
        self.adapters[name] = (base, path)
        return results[0].message

    async def unload_adapter(self, name: str, timeout_s: float = 120.0) -> str:
        """Unload a LoRA adapter from every ready engine serving it, and forget it."""
        engines = self._ready(name)
        if not engines:
            raise NoEngine()
        self.adapters.pop(name, None)
        results = await self._ask_each(engines, lambda: UnloadAdapter(_rid("lora"), name), timeout_s)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        return results[0].message

    async def _ask_each(self, engines: list["EngineConnection"], make: Callable[[], OneAnswer],
                        timeout_s: float) -> list[Any]:
        """The same request (a new id each) to each engine: answers, or the exceptions."""
        return await asyncio.gather(*(self._ask(e, make(), timeout_s) for e in engines), return_exceptions=True)

    def _replay_adapters(self, engine: "EngineConnection") -> None:
        """Adapters loaded at run time that a ready engine of their base model
        lacks (it restarted, or joined): loaded on it once per engine life."""
        served = {m.name for m in engine.models()}
        for name, (base, path) in self.adapters.items():
            if base in served and name not in served and name not in engine.replayed:
                engine.replayed.add(name)
                log.info("loading LoRA adapter %s on engine at %s (it was loaded at run time)", name, engine.endpoint)
                task = asyncio.ensure_future(self._ask(engine, LoadAdapter(_rid("lora"), name, path), 120.0))
                task.add_done_callback(lambda t, n=name: t.cancelled() or t.exception() is None or log.error(
                    "could not load LoRA adapter %s again on engine at %s: %s", n, engine.endpoint, t.exception()))

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
        if not stream.finished:
            return
        if stream.key_bytes and self.router.learn(stream.key_bytes, stream.prompt_tokens):
            for e in self.engines:
                if e.status is not None:
                    e.record.resize(e.status.kv_cache_tokens, self.router.bytes_per_token)

    def _ready(self, model: str | None = None) -> list[EngineConnection]:
        """The ready engines (serving `model`, when given)."""
        return [e for e in self.engines if e.ready and (model is None or e.serves(model))]

    def _pick(self, model: str | None = None) -> EngineConnection | None:
        """The least-loaded ready engine (serving `model`, when given)."""
        ready = self._ready(model)
        if not ready:
            return None
        return min(ready, key=lambda e: (e.load, e.kv_cache_usage))

    # ------------------------------------------------------------------ receiving

    async def _recv_loop(self, engine: EngineConnection) -> None:
        while True:
            payload = await engine.sock.recv(copy=False)
            try:
                msg = decode_engine_message(payload.buffer)
            except Exception as e:
                log.warning("undecodable message from engine %s: %s", engine.endpoint, e)
                continue
            # Any message is a sign of life: a status waiting behind outputs in a busy
            # gateway must not make a working engine look silent.
            engine.last_seen = time.monotonic()
            handler = self._handlers.get(type(msg))
            if handler is None:
                continue
            try:
                handler(engine, msg)
            except Exception:  # a bug in one handler must not deafen the gateway to the engine
                log.exception("handling a %s from engine %s failed", type(msg).__name__, engine.endpoint)

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
        orphans: list[str] | None = None
        # Each stream gets its output once per message (an SSE stream: one write).
        touched: dict[int, RequestStream] = {}
        for d in deltas:
            stream = streams.get(d.request_id)
            if stream is None or isinstance(stream, Reply):
                # Output for a request this gateway gave up on (its abort may have
                # crossed it, or the engine was silent and its requests failed):
                # stop it, rather than generate for a client that is gone.
                if d.finish_reason is None:
                    orphans = orphans or []
                    orphans.append(d.request_id)
                continue
            stream.add(d)
            touched[id(stream)] = stream
        for stream in touched.values():
            stream.deliver()
        if orphans:
            engine.send(Abort(list(dict.fromkeys(orphans))))

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
        if previous is None or previous.instance != status.instance:
            engine.replayed = set()
        if previous is None or previous.kv_cache_tokens != status.kv_cache_tokens:
            engine.record.resize(status.kv_cache_tokens, self.router.bytes_per_token)
        if status.state not in ("ready", "draining") and engine.streams:
            self._fail_all(engine, f"the engine is {status.state}")
        if previous is None or previous.state != status.state or previous.instance != status.instance:
            log.info("engine %s at %s is %s (model %s)", status.engine_id, engine.endpoint, status.state, status.model)
        if engine.silent:
            engine.silent = False
            log.info("engine %s at %s answers again", status.engine_id, engine.endpoint)
        engine.status = status
        engine.error = None
        engine.last_seen = time.monotonic()
        if status.state == "ready" and self.adapters:
            self._replay_adapters(engine)

    def _fail_all(self, engine: EngineConnection, why: str) -> None:
        streams, engine.streams = engine.streams, {}
        for rid, stream in streams.items():
            stream.fail(RequestFailed(rid, FailureKind.ENGINE_UNAVAILABLE, why))

    async def _monitor_loop(self, engine: EngineConnection) -> None:
        while True:
            event = parse_monitor_message(await engine.monitor.recv_multipart())
            if event["event"] & HANDSHAKE_FAILED:
                why = _HANDSHAKE_ERRORS.get(event["event"], "the security handshake failed")
                if engine.error != why:
                    log.error("engine at %s: %s (check ENGINE_CURVE_PUBLIC_KEY_FILE and that the engine "
                              "authorizes this gateway's key)", engine.endpoint, why)
                engine.error = why
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED and engine.status is not None:
                log.error("lost the connection to engine %s at %s; failing its %d request(s)",
                          engine.status.engine_id, engine.endpoint, len(engine.streams))
                engine.status = None  # out of routing until it answers again
                self._fail_all(engine, "the engine went away (its process exited or the connection dropped)")

    async def _heartbeat_loop(self) -> None:
        hello = Hello(self.gateway_id, PROTOCOL_VERSION)
        due = time.monotonic()
        while True:
            now = time.monotonic()
            # This loop's own lateness: with the gateway's CPU saturated, answers
            # wait unread too, and an engine is not judged silent for that.
            lag = max(0.0, now - due)
            for e in self.engines:
                if e.status is not None and now - e.last_seen > e.timeout_s + lag:
                    if e.streams:
                        log.error("engine at %s stopped answering (nothing from it for %.1f s; this loop ran "
                                  "%.1f s late); failing its %d request(s)", e.endpoint, now - e.last_seen, lag,
                                  len(e.streams))
                        # Aborted too: should the engine come back, it stops them at once.
                        e.send(Abort(list(e.streams)))
                        self._fail_all(e, "the engine stopped answering")
                    elif not e.silent:
                        log.warning("engine at %s silent for %.1f s: not routing to it until it answers",
                                    e.endpoint, now - e.last_seen)
                    e.silent = True
                e.send(hello)
            due = time.monotonic() + HEARTBEAT_S
            await asyncio.sleep(HEARTBEAT_S)


def _rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class NoEngine(Exception):
    """No engine is ready to take a request."""


class Unencodable(Exception):
    """A request holds a value the wire cannot carry (an integer beyond 64 bits
    in a free-form field)."""

