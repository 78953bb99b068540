"""Writes vllm-gateway.json, the Grafana dashboard (run after editing the panels)."""

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def panel(i: int, title: str, exprs: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries") -> dict:
    return {
        "id": i, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((i - 1) % 2), "y": 8 * ((i - 1) // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"datasource": DS, "expr": e, "legendFormat": legend, "refId": chr(65 + n)}
                    for n, (e, legend) in enumerate(exprs)],
    }


def quantiles(metric: str, selector: str = '{model_name=~"$model"}') -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{selector}[$__rate_interval])))", f"p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


panels = [
    panel(1, "Output tokens/s", [('sum(rate(vllm:generation_tokens_total{model_name=~"$model"}[$__rate_interval]))', "generated"),
                                 ('sum(rate(vllm:prompt_tokens_total{model_name=~"$model"}[$__rate_interval]))', "prompt")]),
    panel(2, "Requests running / waiting", [('sum by (engine) (vllm_gateway:engine_requests_running{model_name=~"$model"})', "running {{engine}}"),
                                             ('sum by (engine) (vllm_gateway:engine_requests_waiting{model_name=~"$model"})', "waiting {{engine}}")]),
    panel(3, "Time to first token", quantiles("vllm:time_to_first_token_seconds"), "s"),
    panel(4, "Inter-token latency", quantiles("vllm:inter_token_latency_seconds"), "s"),
    panel(5, "End-to-end request latency", quantiles("vllm:e2e_request_latency_seconds"), "s"),
    panel(6, "Queue time", quantiles("vllm:request_queue_time_seconds"), "s"),
    panel(7, "KV cache usage", [('avg by (engine) (vllm_gateway:engine_kv_cache_usage_perc{model_name=~"$model"})', "engine {{engine}}")], "percentunit"),
    panel(8, "Finished requests/s by reason", [('sum by (finished_reason) (rate(vllm:request_success_total{model_name=~"$model"}[$__rate_interval]))', "{{finished_reason}}")]),
    panel(9, "Gateway requests/s by route and status", [('sum by (route, status) (rate(vllm_gateway:requests_total[$__rate_interval]))', "{{route}} {{status}}")]),
    panel(10, "Gateway errors/s by type", [('sum by (type) (rate(vllm_gateway:errors_total[$__rate_interval]))', "{{type}}")]),
    panel(11, "Gateway in-flight requests and stream batches/s", [('sum(vllm_gateway:requests_in_flight)', "in flight"),
                                                                    ('sum by (intake) (rate(vllm_gateway:stream_batches_total[$__rate_interval]))', "batches/s {{intake}}")]),
    panel(12, "Engines up", [('vllm_gateway:engine_up', "{{instance}} engine {{engine}}")]),
    panel(13, "Gateway-side time to first token", quantiles("vllm_gateway:time_to_first_token_seconds", ""), "s"),
    panel(14, "Gateway process CPU and memory", [('rate(process_cpu_seconds_total{job=~"vllm-gateway.*"}[$__rate_interval])', "CPU {{instance}}"),
                                                 ('process_resident_memory_bytes{job=~"vllm-gateway.*"} / 1e6', "RSS MB {{instance}}")]),
]

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus"}],
    "title": "vllm-gateway", "uid": "vllm-gateway", "schemaVersion": 39, "version": 1, "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"}, "tags": ["vllm", "llm"],
    "templating": {"list": [{
        "name": "model", "type": "query", "datasource": DS, "query": "label_values(vllm:generation_tokens_total, model_name)",
        "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2,
    }]},
    "panels": panels,
}

Path(__file__).with_name("vllm-gateway.json").write_text(json.dumps(dashboard, indent=2) + "\n")
