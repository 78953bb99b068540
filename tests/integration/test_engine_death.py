"""Integration: an engine run alone (as under supervisord or systemd: no launcher
to notice or reap anything) killed outright mid-stream. The gateway must fail its
requests within a second, with the engine-unavailable error, and vLLM's own
processes must not outlive the engine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from support import MODEL, Proc, child_env, free_port, wait_healthy
from support import Stream


class Answer(threading.Thread):
    """One non-streaming completion, in a thread."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.response: httpx.Response | None = None
        self.at: float | None = None
        self.start()

    def run(self) -> None:
        self.response = httpx.post(self.url + "/v1/completions", timeout=300, json={
            "model": MODEL, "prompt": "Tell me a long story:", "max_tokens": 1000, "ignore_eos": True})
        self.at = time.monotonic()


@pytest.fixture(scope="module")
def lone_engine(run_dir):
    endpoint = f"ipc://{run_dir}/lone-engine"
    engine = Proc("lone-engine", ["vllm_gateway.engine", "--endpoint", endpoint, "--max-model-len", "1024"], child_env(), run_dir,
                  own_group=True)
    port = free_port()
    gateway = Proc("lone-gateway", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint],
                   child_env(), run_dir)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [engine, gateway], 600)
    yield url, engine, gateway
    gateway.stop()
    engine.stop(signal.SIGKILL)


def test_engine_killed_outright_fails_its_requests_within_a_second(lone_engine):
    url, engine, gateway = lone_engine
    # As long as the engine allows (1024): none can end before all are under way.
    streams = [Stream(url, 1000) for _ in range(3)]
    answer = Answer(url)
    deadline = time.monotonic() + 120
    while not all(s.tokens >= 2 for s in streams):
        assert time.monotonic() < deadline and gateway.alive(), (streams, gateway.tail())
        assert all(s.is_alive() for s in streams), streams
        time.sleep(0.05)
    time.sleep(0.2)  # the non-streaming one is under way too
    vllm_children = psutil.Process(engine.popen.pid).children(recursive=True)
    assert vllm_children  # vLLM's engine core and worker

    killed_at = time.monotonic()
    os.kill(engine.popen.pid, signal.SIGKILL)
    for s in streams:
        s.join(30)
    answer.join(30)

    assert all(s.failed for s in streams), streams
    first = min(s.error_at for s in streams) - killed_at
    last = max(s.error_at for s in streams) - killed_at
    assert first < 1.0 and last < 1.0, (first, last)
    for s in streams:
        err = next(e for e in s.events if isinstance(e, dict) and "error" in e)["error"]
        assert err["type"] == "engine_unavailable", err
    assert answer.response is not None and answer.response.status_code == 503, answer.response
    assert answer.at - killed_at < 1.0
    assert answer.response.json()["error"]["type"] == "engine_unavailable"

    # nothing routes to the dead engine
    r = httpx.get(url + "/health", timeout=5)
    assert r.status_code == 503 and not r.json()["engines"][0]["ready"]
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and json.loads(r.text)["error"]["type"] == "service_unavailable_error"

    # vLLM's processes go with the engine even though nothing reaps its process group
    gone, alive = psutil.wait_procs(vllm_children, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
