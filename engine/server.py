"""The engine process: one vLLM AsyncLLM served over a ZeroMQ ROUTER socket.

Gateways connect DEALER sockets and send `Hello`, `Generate` and `Abort`. A
`Generate` is rendered in a short task and added to vLLM; from then on vLLM's
output handler feeds it (engine/running.py), and the deltas of all requests from
one engine step go out as one `Outputs` message per gateway (see `queue_deltas`).
Aborting cancels the setup task, or asks vLLM to abort the request, which frees
its slot and KV cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import time
import uuid
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from vllm import __version__ as VLLM_VERSION
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_gateway.engine.args import ChatSettings
from vllm_gateway.engine.audio import resample_without_torchaudio
from vllm_gateway.engine.chat import ChatRenderer
from vllm_gateway.engine.embeddings import embed
from vllm_gateway.engine.models import ServedModels
from vllm_gateway.engine.failures import BadRequest, to_failure
from vllm_gateway.engine.inputs import InputRenderer
from vllm_gateway.engine.outputs import OutputBuilder
from vllm_gateway.engine.running import Running
from vllm_gateway.engine.stats import CoreTimes, RequestStats, StepClock
from vllm_gateway.engine.watchdog import LoopWatchdog
from vllm_gateway.protocol.endpoints import make_ipc_folder
from vllm_gateway.protocol.metrics import EngineMetrics
from vllm_gateway.protocol.transport import ServerKeys, secure_server
from vllm_gateway.protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Delta,
    Detokenize,
    Done,
    Embed,
    LoadAdapter,
    UnloadAdapter,
    EngineStatus,
    FailureKind,
    Generate,
    Hello,
    Outputs,
    RequestFailed,
    Tokenize,
    Tokens,
    decode_gateway_message,
    encode,
)

log = logging.getLogger("engine.server")

# A gateway that has not said Hello for this long is gone: its requests are aborted.
GATEWAY_TIMEOUT_S = 10.0
# How often load is pushed to every gateway while requests run (routing uses it).
# An idle engine pushes nothing: its answers to the gateways' heartbeats (every
# 0.5 s) carry its status, and an idle process is not woken ten times a second.
STATUS_INTERVAL_S = 0.1  # while busy (routers scrape every 50 ms: at most one interval behind)
IDLE_CHECK_INTERVAL_S = 0.5
METRICS_INTERVAL_S = 1.0


@dataclasses.dataclass
class EngineConfig:
    engine_args: dict[str, Any]
    served_model_name: str
    endpoint: str
    engine_id: str = "0"
    chat: ChatSettings = dataclasses.field(default_factory=ChatSettings)
    lora_modules: list[dict[str, str]] = dataclasses.field(default_factory=list)  # LORA_MODULES
    runtime_lora: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: adapters loaded and unloaded at run time
    lora_root: str | None = None  # LORA_ROOT: run-time adapters only from inside this folder
    keys: ServerKeys | None = None  # CURVE, for tcp:// beyond loopback
    # ENGINE_STALL_TIMEOUT_S: requests running and vLLM silent this long: stuck (0: never).
    stall_timeout_s: float = 180.0
    # ENGINE_DRAIN_TIMEOUT_S: on SIGTERM, running requests may finish this long.
    drain_timeout_s: float = 30.0


@dataclasses.dataclass
class Load:
    """The scheduler's latest numbers, for our load reports."""

    running: int = 0
    waiting: int = 0  # as vLLM's vllm:num_requests_waiting counts: waiting for capacity, and deferred
    kv_cache_usage: float = 0.0
    running_lora_adapters: list[str] = dataclasses.field(default_factory=list)
    waiting_lora_adapters: list[str] = dataclasses.field(default_factory=list)

    def now(self, in_engine: int | None) -> tuple[int, int]:
        """Running and waiting with `in_engine` generations here now (None: not
        counted, an embedding engine). The scheduler's numbers are as of its last
        step: the requests that came since wait for its next one, and those that
        ended since (finished, aborted) are gone, though an idle scheduler may
        never say so. Which of them ended is not known: running ones are taken
        off first (a finished request was running)."""
        running, waiting = int(self.running), int(self.waiting)
        if in_engine is None:
            return running, waiting
        if in_engine >= running + waiting:
            return running, in_engine - running
        waiting = min(waiting, in_engine)
        return min(running, in_engine - waiting), waiting


class _LoadRecorder(StatLoggerBase):
    """A vLLM stat logger that writes the scheduler's numbers into its server's `Load`."""

    def __init__(self, load: Load) -> None:
        self.load = load

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            load = self.load
            load.running = scheduler_stats.num_running_reqs
            load.waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            load.running_lora_adapters = list(getattr(scheduler_stats, "running_lora_adapters", None) or ())
            load.waiting_lora_adapters = list(getattr(scheduler_stats, "waiting_lora_adapters", None) or ())

    def log_engine_initialized(self) -> None:
        pass


def _lighten_output_path(llm: AsyncLLM, own_stats: bool) -> StepClock | None:
    """Costs vLLM's output handler pays on every token that this process does not
    need (together a third of its CPU at 128 streams, by py-spy):

    - vLLM's Prometheus stat logger: no one scrapes this process's registry (the
      gateway exports the engines' metrics, from `RequestStats`). Our own logger
      (`_LoadRecorder`) and vLLM's periodic log line stay.
    - `vllm.envs` reads the environment on every attribute access until
      `enable_envs_cache()`, which vLLM's engine core calls once it is up; its
      output handler reads one per token. The environment is settled by now.
    - With `own_stats`, vLLM's per-iteration stats (`IterationStats`, about 0.9 µs
      per token): what our metrics take from them, the engine core's queued and
      scheduled events and each step's timestamp, is read here instead, from
      the outputs that carry events (a request's first, and its preemptions).
      The output handler (started with the engine) looks the processor's
      `process_outputs` up at every step, so it finds the one set here.
      The engine core keeps its stats on: the scheduler's load comes from them.
      Returns the clock that `RequestStats` read then; None if this vLLM's
      output processor is not the one this was written for.
    """
    from vllm import envs
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    manager = getattr(llm, "logger_manager", None)
    if manager is not None and hasattr(manager, "stat_loggers"):
        manager.stat_loggers = [s for s in manager.stat_loggers if not isinstance(s, PrometheusStatLogger)]
    if hasattr(envs, "enable_envs_cache"):
        envs.enable_envs_cache()
    if not own_stats:
        return None
    try:
        from vllm.v1.engine import EngineCoreEventType
        kinds = (EngineCoreEventType.QUEUED, EngineCoreEventType.SCHEDULED, EngineCoreEventType.PREEMPTED)
        processor = llm.output_processor
        states = processor.request_states
        original = processor.process_outputs
    except (ImportError, AttributeError):
        return None
    if not isinstance(states, dict):
        return None
    clock = StepClock()

    def process_outputs(outputs, engine_core_timestamp=None, iteration_stats=None, *args, **kwargs):
        now = clock.now = engine_core_timestamp or 0.0
        for o in outputs:
            if o.events:
                state = states.get(o.request_id)
                queue = getattr(state, "queue", None)
                if queue is not None:
                    core = getattr(queue, "core_times", None)
                    if core is None:  # before `Running.attach`
                        core = queue.core_times = CoreTimes()
                    core.on_events(o.events, now, *kinds)
        return original(outputs, engine_core_timestamp, None, *args, **kwargs)

    processor.process_outputs = process_outputs
    processor.log_stats = False  # no RequestStateStats for requests added from now on
    return clock


class EngineServer:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:12]
        self.llm: AsyncLLM | None = None
        self.max_model_len = 0
        self.kv_cache_tokens = 0
        self.block_size = self.num_gpu_blocks = self.max_loras = 0
        self.tokenizer: Any = None
        self.inputs: InputRenderer | None = None
        self.chat: ChatRenderer | None = None
        self.models: ServedModels | None = None
        self.load = Load()
        self.clock: StepClock | None = None  # set when vLLM's per-iteration stats are off (`_lighten_output_path`)
        self.tasks: dict[str, asyncio.Task] = {}  # requests being set up, one-answer calls
        self.running: dict[str, Running] = {}  # generations in vLLM
        self._background: set[asyncio.Future] = set()
        self.owner: dict[str, bytes] = {}  # request id -> gateway identity
        # Generations here (taken, being set up or in vLLM): request id -> its n,
        # as vLLM's scheduler counts each sample.
        self.generations: dict[str, int] = {}
        self.gateways: dict[bytes, float] = {}  # identity -> last Hello (monotonic)
        self.incompatible: set[bytes] = set()  # gateways of another protocol version
        self.metrics: dict[bytes, EngineMetrics] = {}  # per gateway: its requests only
        self._pending: dict[bytes, list[Delta]] = {}
        self._flush_scheduled = False
        self.progress = 0  # outputs vLLM has handed over, ever
        self._progress_seen = 0
        self.last_progress = time.monotonic()  # when vLLM last handed one over (or had nothing to do)
        self.stalled = False
        self.draining = False  # stopping once the requests running are done (_on_stop_signal)
        self._stopping = asyncio.Event()
        self._busy = False  # requests here, as the status loop last saw
        self._work_arrived = asyncio.Event()  # at an idle engine: the status loop reports it at once
        # What each gateway message does (one handler per message type).
        self._handlers: dict[type, Any] = {
            Generate: self._on_request, Tokenize: self._on_request, Detokenize: self._on_request,
            Embed: self._on_request, LoadAdapter: self._on_request, UnloadAdapter: self._on_request,
            Abort: self._on_abort, Hello: self._on_hello,
        }
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        started = time.monotonic()
        resample_without_torchaudio()
        args = AsyncEngineArgs(**self.config.engine_args)
        # vLLM calls a per-engine stat logger factory with (vllm_config, engine_index).
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[lambda config, index=0: _LoadRecorder(self.load)])
        # vLLM's LoRA request counts (vllm:lora_requests_info) come from its
        # per-iteration stats, and its stats log line needs them too.
        own_stats = bool(self.config.engine_args.get("disable_log_stats", True)) and \
            self.llm.vllm_config.lora_config is None
        self.clock = _lighten_output_path(self.llm, own_stats)
        self.max_model_len = self.llm.model_config.max_model_len
        cache = self.llm.vllm_config.cache_config
        self.block_size, self.num_gpu_blocks = int(cache.block_size or 0), int(cache.num_gpu_blocks or 0)
        self.kv_cache_tokens = self.num_gpu_blocks * self.block_size
        lora = self.llm.vllm_config.lora_config
        self.max_loras = int(lora.max_loras) if lora is not None else 0
        self.tokenizer = self.llm.get_tokenizer()
        self.chat = ChatRenderer(self.llm, self.config.chat)
        task = "embed" if self.llm.model_config.runner_type == "pooling" else "generate"
        if task == "generate":
            self.chat.warmup()
        self.inputs = InputRenderer(self.tokenizer, self.max_model_len, self.chat)
        self.models = ServedModels(self.config.served_model_name, str(self.config.engine_args.get("model", "")), task,
                                   self.max_model_len, bool(self.config.engine_args.get("enable_lora")),
                                   self.config.runtime_lora, self.config.lora_root)
        for module in self.config.lora_modules:
            try:
                await self.models.load(self.llm, module["name"], module["path"], at_start=True)
            except BadRequest as e:
                log.error("LORA_MODULES: %s", e)
                self.llm.shutdown()
                return 2
        _freeze_startup_heap()
        log.info(
            "engine %s ready in %.1f s: model %s, max_model_len %d",
            self.config.engine_id, time.monotonic() - started,
            self.config.served_model_name, self.max_model_len,
        )
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        auth = secure_server(self.sock, self.config.keys)
        make_ipc_folder(self.config.endpoint)
        self.sock.bind(self.config.endpoint)
        log.info("engine %s listening on %s", self.config.engine_id, self.config.endpoint)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        workers = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._status_loop())]
        watchdog = LoopWatchdog(loop)
        watchdog.start()
        await self._stopping.wait()
        watchdog.stop()
        log.info("engine %s stopping", self.config.engine_id)
        for t in workers:
            t.cancel()
        if self.stalled:
            # vLLM's shutdown would wait on the stuck core: leave at once; the
            # reaper (or the supervisor) kills what is left of the group.
            await asyncio.sleep(0.2)  # the failures and the status reach the gateways
            logging.shutdown()
            os._exit(3)
        for t in list(self.tasks.values()):
            t.cancel()
        died = self.llm.errored  # read before shutdown, which marks the core dead
        self._broadcast_status("stopping")
        await asyncio.sleep(0.05)
        self.llm.shutdown()
        if auth is not None:
            auth.stop()
        self.sock.close(0)
        self.ctx.term()
        return 1 if died else 0

    # ------------------------------------------------------------------- messages

    async def _recv_loop(self) -> None:
        assert self.sock is not None
        while True:
            ident, payload = await self.sock.recv_multipart(copy=True)
            try:
                msg = decode_gateway_message(payload)
            except Exception as e:  # a broken peer must not take the engine down
                log.warning("undecodable message from gateway: %s", e)
                continue
            handler = self._handlers.get(type(msg))
            if handler is not None:
                handler(ident, msg)

    def _on_request(self, ident: bytes, msg: Any) -> None:
        if ident in self.incompatible:
            return
        if isinstance(msg, Generate):
            self._start(ident, msg)
        else:
            self._start_call(ident, msg)

    def _on_abort(self, ident: bytes, msg: Abort) -> None:
        for rid in msg.request_ids:
            self.abort(rid)

    def _on_hello(self, ident: bytes, msg: Hello) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            if ident not in self.incompatible:
                self.incompatible.add(ident)
                log.error("gateway %s speaks protocol version %d, this engine %d: refusing its requests "
                          "(run the same vllm-gateway version on both)", msg.gateway_id,
                          msg.protocol_version, PROTOCOL_VERSION)
        elif ident not in self.gateways:
            log.info("gateway %s connected", msg.gateway_id)
        self.gateways[ident] = time.monotonic()
        self._send(ident, self._status(ident=ident))

    def _start(self, ident: bytes, req: Generate) -> None:
        rid = req.request_id
        if self.draining:  # sent before its gateway learnt of the drain: the client gets a 503 to retry
            self._send(ident, RequestFailed(rid, FailureKind.ENGINE_UNAVAILABLE, "the engine is stopping"))
            return
        if rid in self.tasks or rid in self.running:
            self._send(ident, RequestFailed(rid, FailureKind.BAD_REQUEST, f"duplicate request id {rid}"))
            return
        self.gateways.setdefault(ident, time.monotonic())
        self.owner[rid] = ident
        self.generations[rid] = max(1, req.params.n)
        self.tasks[rid] = asyncio.create_task(self._generate(ident, req))
        if not self._busy:
            self._work_arrived.set()

    def _status(self, state: str = "ready", ident: bytes | None = None) -> EngineStatus:
        """The status for the gateway `ident` (its `in_engine`); for all, see `_broadcast_status`."""
        load = self.load
        running, waiting = load.now(self._counted())
        if self.stalled or (self.llm is not None and self.llm.errored):
            state = "failed"
        elif self.draining and state == "ready":
            state = "draining"
        return EngineStatus(
            engine_id=self.config.engine_id,
            instance=self.instance,
            state=state,  # type: ignore[arg-type]
            model=self.config.served_model_name,
            max_model_len=self.max_model_len,
            running=running,
            waiting=waiting,
            kv_cache_usage=float(load.kv_cache_usage),
            pid=os.getpid(),
            protocol_version=PROTOCOL_VERSION,
            vllm_version=VLLM_VERSION,
            models=self.models.info() if self.models is not None else [],
            kv_cache_tokens=self.kv_cache_tokens,
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            max_loras=self.max_loras,
            running_lora_adapters=list(load.running_lora_adapters),
            waiting_lora_adapters=list(load.waiting_lora_adapters),
            in_engine=self._in_engine().get(ident, 0) if ident is not None else 0,
        )

    def _counted(self) -> int | None:
        """The generations here, when they are all vLLM holds (a generating engine)."""
        if self.models is None or self.models.task != "generate":
            return None
        return sum(self.generations.values())

    def _in_engine(self) -> dict[bytes, int]:
        """Each gateway's generations here now, n each (its share of `_counted`)."""
        out: dict[bytes, int] = {}
        owner = self.owner
        for rid, n in self.generations.items():
            ident = owner.get(rid)
            if ident is not None:
                out[ident] = out.get(ident, 0) + n
        return out

    def _broadcast_status(self, state: str = "ready") -> None:
        status = self._status(state)
        mine = self._in_engine()
        for ident in list(self.gateways):
            self._send(ident, msgspec.structs.replace(status, in_engine=mine.get(ident, 0)))

    def _metrics_for(self, ident: bytes) -> EngineMetrics:
        m = self.metrics.get(ident)
        if m is None:
            m = self.metrics[ident] = EngineMetrics.new(self.config.engine_id, self.config.served_model_name, self.max_model_len)
        return m

    def _send_metrics(self) -> None:
        load = self.load
        running, waiting = load.now(self._counted())
        for ident in list(self.gateways):
            m = self._metrics_for(ident)
            m.running, m.waiting, m.kv_cache_usage = running, waiting, float(load.kv_cache_usage)
            self._send(ident, m)

    async def _status_loop(self) -> None:
        next_metrics = time.monotonic() + METRICS_INTERVAL_S
        while True:
            interval = STATUS_INTERVAL_S if self._busy else IDLE_CHECK_INTERVAL_S
            slept_from = time.monotonic()
            if self._busy:
                await asyncio.sleep(interval)
            else:
                self._work_arrived.clear()
                try:
                    await asyncio.wait_for(self._work_arrived.wait(), interval)
                except asyncio.TimeoutError:
                    pass
            now = time.monotonic()
            if now >= next_metrics:
                next_metrics = now + METRICS_INTERVAL_S
                self._send_metrics()
            if now - slept_from > interval + 1.0:
                # This loop itself was held up (a long synchronous step): the
                # gateways' heartbeats are waiting unread, so their silence says nothing.
                for ident in self.gateways:
                    self.gateways[ident] = now
            for ident, seen in list(self.gateways.items()):
                if now - seen > GATEWAY_TIMEOUT_S:
                    self._forget_gateway(ident)
            if self.llm is not None and self.llm.errored:
                log.error("vLLM engine core died: %s", self.llm.dead_error)
                self._stopping.set()
            if not self.running or self.progress != self._progress_seen:
                self._progress_seen = self.progress
                self.last_progress = now  # idle time is no stall
            elif 0 < self.config.stall_timeout_s < now - self.last_progress and not self.stalled:
                self._stall(now - self.last_progress)
            was_busy = self._busy
            self._busy = bool(self.tasks or self.running)
            if self._busy or was_busy:  # once more after the last request: its end shows at once
                self._broadcast_status()

    def _on_stop_signal(self) -> None:
        """The first SIGTERM drains: the gateways stop routing here and keep the
        requests running, which may finish for ENGINE_DRAIN_TIMEOUT_S; then (or
        at a second signal, or at once with nothing running) the engine stops.
        Whatever order a supervisor stops a box in, work under way ends done."""
        if self.draining or self._stopping.is_set() or not (self.tasks or self.running) \
                or self.config.drain_timeout_s <= 0:
            self._stopping.set()
            return
        self.draining = True
        log.info("engine %s draining: %d request(s) running, up to %.0f s", self.config.engine_id,
                 len(self.tasks) + len(self.running), self.config.drain_timeout_s)
        self._broadcast_status()
        self.spawn(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (self.tasks or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.tasks or self.running:
            log.warning("drain time over; %d request(s) still running are cut off", len(self.tasks) + len(self.running))
        self._stopping.set()

    def _stall(self, silent_s: float) -> None:
        """vLLM has requests and has produced nothing for ENGINE_STALL_TIMEOUT_S
        (a hung kernel, a deadlock, a stopped engine core) while this loop still
        runs: fail the requests, say so, and exit, so that the supervisor (our
        launcher, supervisord, systemd) replaces the engine; its reaper takes the
        whole process group down, stopped processes included."""
        log.error("vLLM made no progress for %.0f s with %d request(s) running (ENGINE_STALL_TIMEOUT_S=%g): "
                  "the engine is stuck; failing its requests and exiting to be replaced",
                  silent_s, len(self.running), self.config.stall_timeout_s)
        self.stalled = True
        for rid in list(self.running):
            ident = self.owner.get(rid)
            self.forget(rid)
            if ident is not None:
                self._send(ident, RequestFailed(rid, FailureKind.ENGINE_UNAVAILABLE,
                                                f"the engine stalled (no progress for {silent_s:.0f} s) and is "
                                                "being replaced; retry the request"))
        self._broadcast_status("failed")
        self._stopping.set()

    def _forget_gateway(self, ident: bytes) -> None:
        del self.gateways[ident]
        self.metrics.pop(ident, None)
        orphans = [rid for rid, owner in self.owner.items() if owner == ident]
        if orphans:
            log.warning("a gateway went silent; aborting its %d request(s)", len(orphans))
        for rid in orphans:
            self.abort(rid)
            # Should the gateway still be there after all, it learns at once.
            self._send(ident, RequestFailed(rid, FailureKind.ENGINE_UNAVAILABLE,
                                            "the engine lost contact with this gateway and stopped the request"))

    def _send(self, ident: bytes, msg: Any) -> None:
        assert self.sock is not None
        self.sock.send_multipart([ident, encode(msg)], copy=False)

    def queue_deltas(self, ident: bytes, deltas: list[Delta]) -> None:
        """Hold deltas until every request of the same engine step has had its
        turn, then send them all in one message per gateway."""
        pending = self._pending.get(ident)
        if pending is None:
            self._pending[ident] = deltas
        else:
            pending += deltas
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for ident, deltas in pending.items():
            self._send(ident, Outputs(deltas))

    # ----------------------------------------------------------------- generation

    async def _generate(self, ident: bytes, req: Generate) -> None:
        """Render the request and hand it to vLLM. The task ends there: vLLM's
        output handler then calls the request's `Running.on_output` with each
        step's output (see `Running`), so no task wakes per request per step."""
        rid = req.request_id
        assert self.llm is not None and self.inputs is not None
        stats = RequestStats(self._metrics_for(ident), self.clock)
        submitted = False
        try:
            assert self.models is not None
            if self.models.task != "generate":
                raise BadRequest(f"The model `{self.models.name}` is an embedding model: it serves /v1/embeddings",
                                 "model")
            lora = self.models.lora(req.model)
            rendered = await self.inputs.render(req)
            chat, kwargs, parsers = rendered.chat, {}, None
            if chat is not None:
                kwargs = self.chat.reasoning_kwargs(chat)
                if self.chat.wants_parser(chat):
                    stream = req.prompt.stream  # type: ignore[union-attr]
                    parsers = lambda: self.chat.output_parser(chat, stream)  # noqa: E731
            if rendered.params.structured_outputs is not None:
                self._verify_structured_outputs(rendered.params, req)
            running = Running(self, ident, rid, OutputBuilder(req, rendered, self.tokenizer, parsers), stats)
            submitted = True
            queue = await self.llm.add_request(rid, rendered.engine_input, rendered.params, lora_request=lora,
                                               **kwargs)
            running.attach(queue)
        except asyncio.CancelledError:
            stats.on_abort()
            self.forget(rid)
            if submitted:  # vLLM may hold it already: by our id, vLLM aborts whatever it holds
                self.spawn(self.llm.abort(rid))
        except Exception as e:
            self.fail(ident, rid, e)
            if submitted and not isinstance(e, EngineDeadError):
                self.spawn(self.llm.abort(rid))
        finally:
            self.tasks.pop(rid, None)

    def fail(self, ident: bytes, rid: str, e: BaseException) -> None:
        """A request's failure as the gateway's `RequestFailed`; the request is forgotten."""
        self.forget(rid)
        if isinstance(e, EngineDeadError):
            self._stopping.set()
        self._send(ident, to_failure(rid, e))

    def forget(self, rid: str) -> None:
        self.running.pop(rid, None)
        self.owner.pop(rid, None)
        self.generations.pop(rid, None)

    def spawn(self, coro: Any) -> None:
        """Run `coro` in the background, keeping it referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def abort(self, rid: str) -> None:
        """Stop a request: cancel its setup, or have vLLM free its slot and KV cache."""
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()
            return
        running = self.running.get(rid)
        if running is not None:
            running.abort()

    def _start_call(self, ident: bytes, msg: Any) -> None:
        """A one-answer request: tokens, embeddings, an adapter loaded or unloaded.
        Embeddings run as tasks an `Abort` can cancel, as generations do."""
        rid = msg.request_id
        if rid in self.tasks or rid in self.running:
            self._send(ident, RequestFailed(rid, FailureKind.BAD_REQUEST, f"duplicate request id {rid}"))
            return
        self.owner[rid] = ident
        self.tasks[rid] = asyncio.create_task(self._call(ident, msg))

    async def _call(self, ident: bytes, msg: Any) -> None:
        assert self.inputs is not None and self.models is not None
        rid = msg.request_id
        answer: Any
        try:
            if isinstance(msg, Detokenize):
                answer = Tokens(rid, text=self.inputs.detokenize(msg.token_ids))
            elif isinstance(msg, Tokenize):
                ids = await self.inputs.tokenize(msg.prompt)
                strs = self.tokenizer.convert_ids_to_tokens(ids) if msg.return_token_strs else None
                answer = Tokens(rid, ids, strs)
            elif isinstance(msg, Embed):
                if self.models.task != "embed":
                    raise BadRequest(f"The model `{self.models.name}` does not support embeddings", "model")
                answer = await embed(self.llm, self.inputs, msg)
            elif isinstance(msg, LoadAdapter):
                answer = Done(rid, await self.models.load(self.llm, msg.name, msg.path))
                self._broadcast_status()  # the models list follows at once
            else:
                answer = Done(rid, await self.models.unload(self.llm, msg.name))
                self._broadcast_status()
        except asyncio.CancelledError:
            return
        except Exception as e:
            answer = to_failure(rid, e)
        finally:
            self.tasks.pop(rid, None)
            self.owner.pop(rid, None)
        self._send(ident, answer)

    def _verify_structured_outputs(self, params: Any, req: Generate) -> None:
        """vLLM's own check of a constraint (the schema, regex or grammar compiles
        for the structured-output backend), here so that its failure names the
        request field it came from. vLLM checks again in `generate`."""
        assert self.llm is not None
        config = self.llm.vllm_config
        so = req.params.structured_outputs
        origin = so.origin if so is not None else "tools"
        try:
            params.verify(config.model_config, config.speculative_config, config.structured_outputs_config,
                          self.tokenizer)
        except (ValueError, TypeError, VLLMClientError) as e:
            raise BadRequest(f"{origin}: {e.args[0] if e.args else e}", origin) from None


def _freeze_startup_heap() -> None:
    """What vLLM's API server does once it is up: the objects of startup (torch,
    the model's config, the tokenizer: some 700,000 here) leave the garbage
    collector's view, so that a full collection, which stops the loop that
    answers the gateways, no longer walks them (0.3 s each here, before)."""
    try:
        from vllm.utils.gc_utils import freeze_gc_heap
    except ImportError:  # a vLLM without it: the same two steps
        gc.collect()
        gc.freeze()
    else:
        freeze_gc_heap()


def supported_engine_args() -> set[str]:
    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def engine_arg_parser() -> Any:
    """vLLM's own parser of its engine arguments (`vllm serve`'s engine flags)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm-gateway engine")
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def serve(config: EngineConfig) -> int:
    """Run the engine until SIGTERM/SIGINT; returns the process exit code."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(EngineServer(config).run())
