"""Start-up and first-token figures of `vllm-gateway` on this machine.

Starts a real engine and a real HTTP gateway (separately, so each is timed), then
measures the time to first token of streamed chat requests. Prints one JSON line.

    .venv/bin/python benchmarks/startup.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait(pred, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError


def ttft(url: str) -> tuple[float, float]:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 20, "stream": True}
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


def main() -> None:
    env = dict(os.environ, DTYPE=os.environ.get("DTYPE", "float32"))
    run_dir = tempfile.mkdtemp(prefix="vgw-bench-")
    endpoint = f"ipc://{run_dir}/engine-0"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(os.path.join(run_dir, "log"), "wb")

    gw = subprocess.Popen([sys.executable, "-m", "vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint],
                          env=env, stdout=out, stderr=subprocess.STDOUT)

    def listening() -> bool:
        try:
            return httpx.get(url + "/health", timeout=0.5).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    gateway_start = wait(listening, 30)
    gateway_rss_idle = rss_mb(gw.pid)

    engine = subprocess.Popen([sys.executable, "-m", "vllm_gateway.engine", "--endpoint", endpoint], env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        engine_start = wait(lambda: httpx.get(url + "/health", timeout=0.5).status_code == 200, 900)
        first_ttft, first_total = ttft(url)
        warm = [ttft(url) for _ in range(5)]
        figures = {
            "benchmark": "startup",
            "gateway_start_s": round(gateway_start, 3),
            "gateway_rss_mb_idle": round(gateway_rss_idle, 1),
            "engine_start_s": round(engine_start, 1),
            "ttft_first_request_s": round(first_ttft, 3),
            "ttft_warm_median_s": round(sorted(t for t, _ in warm)[2], 3),
            "e2e_20_tokens_warm_median_s": round(sorted(t for _, t in warm)[2], 3),
            "gateway_rss_mb_after": round(rss_mb(gw.pid), 1),
        }
    finally:
        for p in (gw, engine):
            p.terminate()
        for p in (gw, engine):
            p.wait(60)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
