"""Per-request timing and token counts, folded into each gateway's `EngineMetrics`.

vLLM's own Prometheus logger measures the same things engine-wide; here they are
kept per gateway (see protocol/metrics.py), from what vLLM's output handler hands
over: the time of each output, its new tokens, and the engine core's timestamps
(queued, scheduled, each step's), from which the queue, prefill and decode times
come. Those are read as vLLM's per-iteration stats read them (`IterationStats`),
which this engine then turns off (`CoreTimes`, engine/server.py); where they
stay on, from vLLM's request stats at the end.
"""

from __future__ import annotations

import time

from vllm_gateway.protocol.metrics import EngineMetrics


class StepClock:
    """The engine core's timestamp of the step whose outputs are being handed over."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class CoreTimes:
    """One request's engine-core timestamps, as vLLM's RequestStateStats names
    them, read from the core's events as vLLM's `IterationStats` reads them."""

    __slots__ = ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts", "num_preemptions")

    def __init__(self) -> None:
        self.queued_ts = self.scheduled_ts = self.first_token_ts = self.last_token_ts = 0.0
        self.num_preemptions = 0

    def on_events(self, events: list, step_ts: float, queued: object, scheduled: object, preempted: object) -> None:
        """Events come with a request's outputs, always with its first (queued,
        scheduled); the types are vLLM's `EngineCoreEventType` members."""
        if not self.first_token_ts:
            self.first_token_ts = step_ts
        for e in events:
            kind = e.type
            if kind == queued:
                self.queued_ts = e.timestamp
            elif kind == scheduled:
                if not self.scheduled_ts:  # a preempted request's later schedules do not count
                    self.scheduled_ts = e.timestamp
            elif kind == preempted:
                self.num_preemptions += 1


class RequestStats:
    __slots__ = ("metrics", "clock", "core", "start", "first", "last", "outputs", "generated", "prompt_tokens", "_itl")

    def __init__(self, metrics: EngineMetrics, clock: StepClock | None = None) -> None:
        self.metrics = metrics
        self.clock = clock  # None: vLLM's own request stats are on, and read at the end
        self.core: CoreTimes | None = None  # the engine core's timestamps, when read here
        self._itl = metrics.histograms["inter_token_latency_seconds"]  # observed on every token
        self.start = time.monotonic()
        self.first = 0.0
        self.last = 0.0
        self.outputs = 0
        self.generated = 0
        self.prompt_tokens = 0

    def on_output(self, num_prompt_tokens: int, new_tokens: int, cached_tokens: int | None = 0) -> None:
        """`cached_tokens`: of the prompt, found in vLLM's prefix cache (read on the first output)."""
        now = time.monotonic()
        m = self.metrics
        if self.outputs == 0:
            self.first = now
            self.prompt_tokens = num_prompt_tokens
            m.prompt_tokens += num_prompt_tokens
            m.prefix_cache_queries += num_prompt_tokens
            m.prefix_cache_hits += cached_tokens or 0
            m.observe("time_to_first_token_seconds", now - self.start)
        elif new_tokens:
            self._itl.observe(now - self.last)
        self.last = now
        self.outputs += 1
        self.generated += new_tokens
        m.generation_tokens += new_tokens
        core = self.core
        if core is not None:
            # An output handed over late (it came while the request was being
            # attached) is stamped with a later step: no earlier than its first.
            core.last_token_ts = max(self.clock.now, core.first_token_ts)

    def on_finish(self, reasons: list[str], core_stats: object | None) -> None:
        """`reasons`: the finish reason of each choice; `core_stats`: vLLM's
        RequestStateStats of the request, when its own stats are on."""
        m = self.metrics
        if core_stats is None:
            core_stats = self.core
        now = time.monotonic()
        for r in reasons:
            m.finished(r)
        m.observe("e2e_request_latency_seconds", now - self.start)
        m.observe("request_prompt_tokens", self.prompt_tokens)
        m.observe("request_generation_tokens", self.generated)
        if self.generated > 1:
            m.observe("request_time_per_output_token_seconds", (self.last - self.first) / (self.generated - 1))
        queued = getattr(core_stats, "queued_ts", 0.0)
        scheduled = getattr(core_stats, "scheduled_ts", 0.0)
        first_token = getattr(core_stats, "first_token_ts", 0.0)
        last_token = getattr(core_stats, "last_token_ts", 0.0)
        if queued and scheduled >= queued:
            m.observe("request_queue_time_seconds", scheduled - queued)
        if scheduled and first_token >= scheduled:
            m.observe("request_prefill_time_seconds", first_token - scheduled)
        if first_token and last_token >= first_token:
            m.observe("request_decode_time_seconds", last_token - first_token)
        if scheduled and last_token >= scheduled:
            m.observe("request_inference_time_seconds", last_token - scheduled)
        m.preemptions += getattr(core_stats, "num_preemptions", 0)

    def on_abort(self) -> None:
        self.metrics.finished("abort")
        self.metrics.observe("e2e_request_latency_seconds", time.monotonic() - self.start)
