"""Prometheus metrics of one gateway process (`GET /metrics`, or `METRICS_PORT` for
the RunPod worker).

Engine metrics keep vLLM's names and labels (`vllm:...{model_name, engine}`), so
vLLM dashboards work unchanged; each engine reports them over the protocol, and
each gateway exposes its own share of every engine (see protocol/metrics.py), so
sums over several gateways are right. The gateway's own metrics are
`vllm_gateway:...`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vllm_gateway.protocol.metrics import HISTOGRAMS, TIME_TO_FIRST_TOKEN_BUCKETS, EngineMetrics

if TYPE_CHECKING:
    from vllm_gateway.gateway.engines.client import EngineClient

REGISTRY = CollectorRegistry(auto_describe=False)

REQUESTS = Counter("vllm_gateway:requests", "Client requests by route and status.",
                   ["route", "status"], registry=REGISTRY)
ERRORS = Counter("vllm_gateway:errors", "Errors returned to clients, by OpenAI error type.",
                 ["type"], registry=REGISTRY)
IN_FLIGHT = Gauge("vllm_gateway:requests_in_flight", "Client requests being served now.", registry=REGISTRY)


class _Tally:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class _StreamBatches:
    """Stream writes by intake. Counted on every streamed write, so plain ints
    (a prometheus_client Counter takes a lock per increment), read at scrape."""

    def __init__(self, intakes: tuple[str, ...]) -> None:
        self.tallies = {intake: _Tally() for intake in intakes}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("vllm_gateway:stream_batches",
                                     "Stream writes: SSE batches (http) or stream outputs (runpod).", labels=["intake"])
        for intake, tally in self.tallies.items():
            family.add_metric([intake], tally.value)
        yield family


STREAM_BATCHES = _StreamBatches(("http", "runpod"))
REGISTRY.register(STREAM_BATCHES)
TTFT = Histogram("vllm_gateway:time_to_first_token_seconds",
                 "From a request's submission to an engine to its first output, as the gateway sees it.",
                 buckets=TIME_TO_FIRST_TOKEN_BUCKETS, registry=REGISTRY)

HTTP_BATCHES = STREAM_BATCHES.tallies["http"]
RUNPOD_BATCHES = STREAM_BATCHES.tallies["runpod"]

_HELP = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "request_time_per_output_token_seconds": "Histogram of time_per_output_token_seconds per request.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "request_prompt_tokens": "Number of prefill tokens processed.",
    "request_generation_tokens": "Number of generation tokens processed.",
}


class EngineCollector:
    """Turns the latest `EngineMetrics` of every engine into Prometheus families
    at scrape time."""

    def __init__(self, client: Callable[[], "EngineClient | None"]) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        engines = client.engines if client is not None else []
        labels = ["model_name", "engine"]
        up = GaugeMetricFamily("vllm_gateway:engine_up", "1 while the engine is ready for requests.",
                               labels=["engine", "endpoint"])
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels)
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels)
        generation = CounterMetricFamily("vllm:generation_tokens", "Number of generation tokens processed.", labels=labels)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=labels)
        cache_queries = CounterMetricFamily("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.", labels=labels)
        cache_hits = CounterMetricFamily("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.", labels=labels)
        routed = CounterMetricFamily("vllm_gateway:routing_decisions",
                                     "Requests this gateway routed to the engine, by reason: prefix (its KV cache likely "
                                     "holds the prompt's beginning), least_loaded, or spill (the prefix's engines were "
                                     "too busy).", labels=["engine", "endpoint", "reason"])
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*labels, "finished_reason"])
        histograms = {name: HistogramMetricFamily(f"vllm:{name}", _HELP[name], labels=labels) for name in HISTOGRAMS}
        for e in engines:
            engine_id = e.status.engine_id if e.status else ""
            up.add_metric([engine_id, e.endpoint], 1.0 if e.ready else 0.0)
            for reason, n in sorted(e.choices.items()):
                routed.add_metric([engine_id, e.endpoint, reason], n)
            m: EngineMetrics | None = e.metrics
            if m is None:
                continue
            values = [m.model, m.engine_id]
            running.add_metric(values, m.running)
            waiting.add_metric(values, m.waiting)
            kv.add_metric(values, m.kv_cache_usage)
            prompt.add_metric(values, m.prompt_tokens)
            generation.add_metric(values, m.generation_tokens)
            preemptions.add_metric(values, m.preemptions)
            cache_queries.add_metric(values, m.prefix_cache_queries)
            cache_hits.add_metric(values, m.prefix_cache_hits)
            for reason, n in sorted(m.success.items()):
                success.add_metric([*values, reason], n)
            for name, h in m.histograms.items():
                family = histograms[name]
                cumulative, buckets = 0, []
                for bound, n in zip(h.bounds, h.counts):
                    cumulative += n
                    buckets.append((_le(bound), cumulative))
                buckets.append(("+Inf", cumulative + h.counts[-1]))
                family.add_metric(values, buckets, h.sum)
        yield from (up, routed, running, waiting, kv, prompt, generation, preemptions, cache_queries, cache_hits, success,
                    *histograms.values())


def _le(bound: float) -> str:
    return repr(float(bound))


def watch_engines(client: Callable[[], "EngineClient | None"]) -> None:
    """Expose these engines' metrics in this process's registry (once)."""
    global _collector
    if _collector is None:
        _collector = EngineCollector(client)
        REGISTRY.register(_collector)


_collector: EngineCollector | None = None


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """A separate /metrics listener in a thread (the RunPod worker has no HTTP server)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=REGISTRY)
