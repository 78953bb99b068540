"""Prometheus metrics of one gateway process (`GET /metrics`, or `METRICS_PORT` for
the RunPod worker).

Engine metrics keep vLLM's names and labels (`vllm:...{model_name, engine}`), so
vLLM dashboards work unchanged. Counters and histograms are per engine, and each
gateway exposes its own share of every engine (see protocol/metrics.py), so sums
over several gateways are right.

The load gauges routers read (`vllm:num_requests_running`, `..._waiting`,
`vllm:kv_cache_usage_perc`, `vllm:cache_config_info`, `vllm:lora_requests_info`)
are the pod's truth, one sample per model: the Gateway API Inference Extension's
endpoint picker and llm-d read the first sample of each name, so a per-engine
first sample would show one engine's queue as the whole pod's. They are the
engines' schedulers' own numbers (vLLM's meaning: running = in the batch,
waiting = not yet scheduled), from the status every engine sends every 100 ms
while busy. Per-engine detail is `vllm_gateway:engine_*{engine}`. The gateway's
own metrics are `vllm_gateway:...`, and the process's `process_*` and `python_*`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vllm_gateway.protocol.messages import EngineStatus
from vllm_gateway.protocol.metrics import HISTOGRAMS, TIME_TO_FIRST_TOKEN_BUCKETS, EngineMetrics

if TYPE_CHECKING:
    from vllm_gateway.gateway.engines.client import EngineClient

REGISTRY = CollectorRegistry(auto_describe=False)
# The process's CPU, memory and open files, and Python's: as every Prometheus
# client exposes them (the dashboard's gateway panel reads process_*).
for _standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_standard)

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
        self.on_arrival = _Tally()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("vllm_gateway:stream_batches",
                                     "Stream writes: SSE batches (http) or stream outputs (runpod).", labels=["intake"])
        for intake, tally in self.tallies.items():
            family.add_metric([intake], tally.value)
        yield family
        yield CounterMetricFamily("vllm_gateway:stream_batches_on_arrival",
                                  "Of the http stream writes, those made as the engine output arrived (the rest, "
                                  "by the stream's task: first and last batches, clients slow to read).",
                                  value=self.on_arrival.value)


STREAM_BATCHES = _StreamBatches(("http", "runpod"))
REGISTRY.register(STREAM_BATCHES)
TTFT = Histogram("vllm_gateway:time_to_first_token_seconds",
                 "From a request's submission to an engine to its first output, as the gateway sees it.",
                 buckets=TIME_TO_FIRST_TOKEN_BUCKETS, registry=REGISTRY)

HTTP_BATCHES = STREAM_BATCHES.tallies["http"]
RUNPOD_BATCHES = STREAM_BATCHES.tallies["runpod"]
HTTP_BATCHES_ON_ARRIVAL = STREAM_BATCHES.on_arrival

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
    at scrape time: counters and histograms, which change with each engine's
    report (once a second). Rendered once per report (`exposition`)."""

    def __init__(self, client: Callable[[], "EngineClient | None"]) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        engines = client.engines if client is not None else []
        labels = ["model_name", "engine"]
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels)
        generation = CounterMetricFamily("vllm:generation_tokens", "Number of generation tokens processed.", labels=labels)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=labels)
        cache_queries = CounterMetricFamily("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.", labels=labels)
        cache_hits = CounterMetricFamily("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.", labels=labels)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*labels, "finished_reason"])
        histograms = {name: HistogramMetricFamily(f"vllm:{name}", _HELP[name], labels=labels) for name in HISTOGRAMS}
        for e in engines:
            m: EngineMetrics | None = e.metrics
            if m is None:
                continue
            values = [m.model, m.engine_id]
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
        yield from (prompt, generation, preemptions, cache_queries, cache_hits, success, *histograms.values())


class LoadCollector:
    """What changes with every engine status (every 100 ms while busy) and every
    request: the routers' gauges, engines up, routing decisions. Cheap, so
    rendered at every scrape."""

    def __init__(self, client: Callable[[], "EngineClient | None"]) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        engines = client.engines if client is not None else []
        yield from self._load(engines)
        up = GaugeMetricFamily("vllm_gateway:engine_up", "1 while the engine is ready for requests.",
                               labels=["engine", "endpoint"])
        routed = CounterMetricFamily("vllm_gateway:routing_decisions",
                                     "Requests this gateway routed to the engine, by reason: prefix (its KV cache likely "
                                     "holds the prompt's beginning), least_loaded, or spill (the prefix's engines were "
                                     "too busy).", labels=["engine", "endpoint", "reason"])
        for e in engines:
            engine_id = e.status.engine_id if e.status else ""
            up.add_metric([engine_id, e.endpoint], 1.0 if e.ready else 0.0)
            for reason, n in sorted(e.choices.items()):
                routed.add_metric([engine_id, e.endpoint, reason], n)
        yield from (up, routed)

    @staticmethod
    def _load(engines: list) -> Iterator[Metric]:
        """The routers' gauges: per model, over the engines serving it (the
        pod's truth as its first sample), then each engine's under
        `vllm_gateway:engine_*`."""
        # Each ready engine's status, and its (running, waiting) with this gateway's own requests up to date.
        rows = [(e.status, e.requests_now()) for e in engines if e.ready and e.status is not None and e.status.model]
        statuses = [st for st, _ in rows]
        models: dict[str, list[tuple[EngineStatus, tuple[int, int]]]] = {}
        for st, now in rows:
            models.setdefault(st.model, []).append((st, now))
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=["model_name"])
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                               labels=["model_name"])
        cache = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=["model_name", "block_size", "num_gpu_blocks"])
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        for model, group in models.items():
            running.add_metric([model], sum(now[0] for _, now in group))
            waiting.add_metric([model], sum(now[1] for _, now in group))
            sts = [st for st, _ in group]
            blocks = sum(st.num_gpu_blocks for st in sts)
            usage = (sum(st.kv_cache_usage * st.num_gpu_blocks for st in sts) / blocks if blocks
                     else sum(st.kv_cache_usage for st in sts) / len(sts))
            kv.add_metric([model], usage)
            if blocks:
                cache.add_metric([model, str(sts[0].block_size), str(blocks)], 1.0)
        if any(st.max_loras for st in statuses):
            lora.add_metric([str(max(st.max_loras for st in statuses)),
                             ",".join(sorted({a for st in statuses for a in st.waiting_lora_adapters})),
                             ",".join(sorted({a for st in statuses for a in st.running_lora_adapters}))], time.time())
        per_engine = ["engine", "model_name"]
        e_running = GaugeMetricFamily("vllm_gateway:engine_requests_running",
                                      "vllm:num_requests_running of one engine.", labels=per_engine)
        e_waiting = GaugeMetricFamily("vllm_gateway:engine_requests_waiting",
                                      "vllm:num_requests_waiting of one engine.", labels=per_engine)
        e_kv = GaugeMetricFamily("vllm_gateway:engine_kv_cache_usage_perc", "vllm:kv_cache_usage_perc of one engine.",
                                 labels=per_engine)
        for st, (r, w) in rows:
            e_running.add_metric([st.engine_id, st.model], r)
            e_waiting.add_metric([st.engine_id, st.model], w)
            e_kv.add_metric([st.engine_id, st.model], st.kv_cache_usage)
        yield from (running, waiting, kv, cache, lora, e_running, e_waiting, e_kv)


def _le(bound: float) -> str:
    return repr(float(bound))


# The engines' counters and histograms: their own registry, rendered once per
# engine report and reused by every scrape in between (routers scrape every
# 50 ms; rendering them is most of a scrape's CPU).
ENGINE_REGISTRY = CollectorRegistry(auto_describe=False)


class _Watch:
    client: Callable[[], "EngineClient | None"] | None = None
    key: tuple = ()
    rendered: bytes = b""


_watch = _Watch()


def watch_engines(client: Callable[[], "EngineClient | None"]) -> None:
    """Expose these engines' metrics in this process's registries (once)."""
    if _watch.client is None:
        _watch.client = client
        REGISTRY.register(LoadCollector(client))
        ENGINE_REGISTRY.register(EngineCollector(client))


def _engine_part() -> bytes:
    client = _watch.client() if _watch.client is not None else None
    # Every report replaces an engine's EngineMetrics object: the same objects,
    # the same rendering.
    key = tuple(id(e.metrics) for e in client.engines) if client is not None else ()
    if key != _watch.key or not _watch.rendered:
        _watch.rendered, _watch.key = generate_latest(ENGINE_REGISTRY), key
    return _watch.rendered


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY) + _engine_part(), CONTENT_TYPE_LATEST


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """A separate /metrics listener in a thread (the RunPod worker has no HTTP server)."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    def app(environ, start_response):
        body, content_type = exposition()
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = make_server(host, port, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
