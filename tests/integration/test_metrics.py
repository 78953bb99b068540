"""Integration: /metrics after real requests, counted exactly (engine metrics under
vLLM's names, the gateway's own), and right with several gateways."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support import MODEL, Proc, child_env, free_port, scrape, value, wait_for, wait_healthy


def test_counts_match_what_was_sent(gateway_url, client):
    url = gateway_url
    wait_for(url, "vllm_gateway:engine_up", 1)
    # The engine reports once a second: what earlier tests generated shows up by
    # the next report, not in this test's counts.
    time.sleep(1.5)
    before = scrape(url)
    prompt_tokens = 0
    for _ in range(3):
        r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, extra_body={"ignore_eos": True})
        prompt_tokens += r.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    prompt_tokens += chunks[-1].usage.prompt_tokens
    bad = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0})
    assert bad.status_code == 400

    gen0 = value(before, "vllm:generation_tokens_total", model_name=MODEL, engine="0")
    after = wait_for(url, "vllm:generation_tokens_total", gen0 + 19, model_name=MODEL, engine="0")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    engine = {"model_name": MODEL, "engine": "0"}
    assert delta("vllm:generation_tokens_total", **engine) == 19
    assert delta("vllm:prompt_tokens_total", **engine) == prompt_tokens
    assert delta("vllm:request_success_total", finished_reason="length", **engine) == 4
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_generation_tokens"):
        assert delta(f"vllm:{h}_count", **engine) == 4, h
    assert delta("vllm:request_generation_tokens_sum", **engine) == 19
    assert delta("vllm:request_prompt_tokens_sum", **engine) == prompt_tokens
    assert 0 < delta("vllm:inter_token_latency_seconds_count", **engine) <= 15
    assert value(after, "vllm:num_requests_running", model_name=MODEL) == 0
    assert 0 <= value(after, "vllm:kv_cache_usage_perc", model_name=MODEL) <= 1
    assert value(after, "vllm_gateway:engine_requests_running", **engine) == 0
    assert value(after, "vllm_gateway:engine_up", engine="0") == 1

    assert delta("vllm_gateway:requests_total", route="/v1/completions", status="200") == 3
    assert delta("vllm_gateway:requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("vllm_gateway:requests_total", route="/v1/chat/completions", status="400") == 1
    assert delta("vllm_gateway:errors_total", type="invalid_request_error") == 1
    assert delta("vllm_gateway:stream_batches_total", intake="http") >= 1
    # the stream's middle tokens were written as they arrived (its first and last by its task)
    assert 1 <= delta("vllm_gateway:stream_batches_on_arrival_total") <= delta("vllm_gateway:stream_batches_total",
                                                                               intake="http") - 2
    assert delta("vllm_gateway:time_to_first_token_seconds_count") == 4
    assert value(after, "vllm_gateway:requests_in_flight") == 1  # this scrape itself


def test_each_gateway_exposes_its_own_share(gateway_url, engine_endpoint, run_dir):
    """Two gateways on one engine: each counts only the requests it sent, so summing
    both gateways' metrics gives the engine's totals."""
    endpoint, engine = engine_endpoint
    port = free_port()
    second = Proc("gateway-b", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint], child_env(), run_dir)
    url_b = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url_b, [second, engine], 600)
        a_before = wait_for(gateway_url, "vllm_gateway:engine_up", 1)
        for _ in range(2):
            r = httpx.post(url_b + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
            assert r.status_code == 200
        b = wait_for(url_b, "vllm:generation_tokens_total", 6, engine="0")
        assert value(b, "vllm:generation_tokens_total", engine="0") == 6
        assert value(b, "vllm:request_success_total", engine="0", finished_reason="length") == 2
        time.sleep(1.2)  # a fresh report from the engine to gateway A too
        a_after = scrape(gateway_url)
        for name in ("vllm:generation_tokens_total", "vllm:request_success_total"):
            assert value(a_after, name, engine="0") == value(a_before, name, engine="0"), name
    finally:
        second.stop()


def _queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once label
    matchers, ranges, `by (...)` and function calls are taken out."""
    import re

    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*(?![a-zA-Z0-9_:]*\s*\()", expr)
    return {n for n in names if n not in ("and", "or", "unless", "offset", "bool")}


def test_dashboard_and_scrape_config_use_exposed_metrics(gateway_url):
    import json

    from support import ROOT

    deadline = time.monotonic() + 10
    while True:  # the engine's first report comes within a second
        families = list(text_string_to_metric_families(httpx.get(gateway_url + "/metrics").text))
        exposed = {f.name + suffix for f in families for suffix in ("", "_total", "_bucket", "_count", "_sum")}
        if any(f.name == "vllm:kv_cache_usage_perc" and f.samples for f in families) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "vllm-gateway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in _queried_metrics(e)}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "vllm:generation_tokens_total"} <= used
    assert used <= exposed, used - exposed
    assert "/metrics" in (ROOT / "deploy" / "prometheus.yml").read_text()
