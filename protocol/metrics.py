"""Engine metrics, as engines report them to gateways.

Names, buckets and meanings are vLLM's own Prometheus metrics (`vllm:...`), so
that dashboards made for vLLM work unchanged. An engine keeps one `EngineMetrics`
per gateway, counting only the requests that gateway sent: each gateway exposes its
share, and sums over several gateways come out right. `running`, `waiting` and
`kv_cache_usage` are whole-engine values, the scheduler's (gateways expose them
from the more frequent `EngineStatus`).
"""

from __future__ import annotations

import bisect

import msgspec

# vLLM's default bucket boundaries (vllm/v1/metrics/buckets.py).
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                               5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def tokens_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's 1-2-5 buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exponent
            if v > max(1, max_model_len):
                return tuple(out)
            out.append(float(v))
        exponent += 1


class Histogram(msgspec.Struct, array_like=True):
    """Cumulative observations: `counts[i]` fall in (bounds[i-1], bounds[i]];
    the last count is above every bound (+Inf)."""

    bounds: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0

    @classmethod
    def new(cls, bounds: tuple[float, ...]) -> "Histogram":
        return cls(bounds, [0] * (len(bounds) + 1))

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


# Histogram name (after "vllm:") -> its buckets; `None`: tokens, sized to the context.
HISTOGRAMS: dict[str, tuple[float, ...] | None] = {
    "time_to_first_token_seconds": TIME_TO_FIRST_TOKEN_BUCKETS,
    "inter_token_latency_seconds": INTER_TOKEN_LATENCY_BUCKETS,
    "request_time_per_output_token_seconds": INTER_TOKEN_LATENCY_BUCKETS,
    "e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
    "request_inference_time_seconds": REQUEST_LATENCY_BUCKETS,
    "request_prefill_time_seconds": REQUEST_LATENCY_BUCKETS,
    "request_decode_time_seconds": REQUEST_LATENCY_BUCKETS,
    "request_prompt_tokens": None,
    "request_generation_tokens": None,
}


class EngineMetrics(msgspec.Struct, tag="metrics", array_like=True):
    """What one engine did for one gateway, cumulative since the engine started."""

    engine_id: str
    model: str
    # Superseded by EngineStatus's (the scheduler's, every 50 ms); kept in the
    # wire's order: the same whole-engine numbers.
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # of the whole engine, 0..1
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    success: dict[str, int] = {}  # finished requests by finish reason (stop, length, abort, error)
    histograms: dict[str, Histogram] = {}
    # vLLM's prefix cache counters, in tokens: prompt tokens looked up, found cached.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @classmethod
    def new(cls, engine_id: str, model: str, max_model_len: int) -> "EngineMetrics":
        tokens = tokens_buckets(max_model_len)
        return cls(engine_id, model, histograms={
            name: Histogram.new(bounds if bounds is not None else tokens) for name, bounds in HISTOGRAMS.items()
        })

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def finished(self, reason: str) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1
