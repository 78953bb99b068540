"""The gateway alone, as processes, in front of the synthetic engine (it speaks the
real protocol; no vLLM): failover between engines, the request cap, clients that
stop reading, a gateway whose own loop is held up, plaintext to an engine on
another (simulated) host. Timing and processes: integration, not unit."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from support import ROOT, Proc, child_env, free_port, wait_healthy
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.protocol.messages import Generate, SamplingParams, TextPrompt


@pytest.fixture()
def synthetic(run_dir, request):
    """A synthetic engine (fast steps) and a gateway in front of it, with the
    gateway settings the test names (`@pytest.mark.parametrize('synthetic', [env], indirect=True)`)."""
    env = dict(getattr(request, "param", {}))
    # A fast talker: 1,000 tokens a step, 200 steps a second (several MB/s), so that a
    # client that reads nothing fills the kernel's buffers in seconds.
    tokens = env.pop("TOKENS_PER_STEP", "1")
    endpoint = f"ipc://{run_dir}/synthetic-rel-{free_port()}"
    engine = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"),
                               "--endpoint", endpoint, "--step-ms", "5", "--tokens-per-step", tokens], env=child_env())
    port = free_port()
    gateway = Proc(f"gateway-rel-{port}", ["vllm_gateway.gateway", "http", "--port", str(port),
                                            "--engine-endpoints", endpoint], child_env(**env), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [gateway], 60)
        yield url, gateway
    finally:
        gateway.stop()
        engine.kill()
        engine.wait()


def in_flight(url: str) -> int:
    return sum(e["in_flight"] for e in httpx.get(url + "/health").json()["engines"])


# ------------------------------------------------------------------- admission


@pytest.mark.parametrize("synthetic", [{"MAX_CONCURRENT_REQUESTS": "2"}], indirect=True)
def test_beyond_the_cap_a_fast_429_in_the_routes_shape(synthetic):
    url, _ = synthetic
    streams = [httpx.stream("POST", url + "/v1/completions", timeout=60, json={
        "model": "synthetic", "prompt": "x", "max_tokens": 100_000, "stream": True}) for _ in range(2)]
    opened = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened)
        started = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "MAX_CONCURRENT_REQUESTS" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/messages", json={"model": "synthetic", "max_tokens": 5,
                                                   "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert r.status_code == 429 and r.json() == {"type": "error", "error": {
            "type": "rate_limit_error", "message": r.json()["error"]["message"]}}
        # what reaches no engine is not limited
        assert httpx.get(url + "/health").status_code == 200
        assert in_flight(url) == 2
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    # the places are free again
    deadline = time.monotonic() + 5
    while in_flight(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(url + "/v1/completions", json={"model": "synthetic", "prompt": "x", "max_tokens": 3}, timeout=10)
    assert r.status_code == 200


# --------------------------------------------------------------- slow clients


def never_reading(url: str) -> socket.socket:
    """A client that asks for an endless stream and reads nothing of it, with a
    small receive window so that the server's writes block soon."""
    body = json.dumps({"model": "synthetic", "prompt": "x", "max_tokens": 10_000_000, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def run_until_cut(url: str, timeout: float = 60) -> None:
    """The stream starts, then ends (the gateway cut it) within `timeout`."""
    deadline = time.monotonic() + timeout
    while in_flight(url) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(url) == 1, "the stream did not start"
    while in_flight(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert in_flight(url) == 0, "the stream of a client that reads nothing still runs"


@pytest.mark.parametrize("synthetic", [{"STREAM_WRITE_TIMEOUT_S": "2", "STREAM_MAX_UNSENT": "0",
                                                "TOKENS_PER_STEP": "1000"}], indirect=True)
def test_a_client_that_stops_reading_is_cut_and_its_engine_request_aborted(synthetic):
    url, gateway = synthetic
    sock = never_reading(url)
    try:
        # never read: within the write timeout (plus the time to fill the buffers), the
        # stream is ended and the engine request aborted
        run_until_cut(url)
        assert "ending a stream: the client read nothing" in gateway.tail(200)
        # the connection is closed: reading drains what was sent, then ends
        sock.settimeout(10)
        while sock.recv(65536):
            pass
    finally:
        sock.close()


@pytest.mark.parametrize("synthetic", [{"STREAM_WRITE_TIMEOUT_S": "0", "STREAM_MAX_UNSENT": "500",
                                                "TOKENS_PER_STEP": "1000"}], indirect=True)
def test_output_piling_up_unsent_is_capped(synthetic):
    url, gateway = synthetic
    sock = never_reading(url)
    try:
        run_until_cut(url)
        assert "engine outputs waited unsent for the client (STREAM_MAX_UNSENT)" in gateway.tail(200)
    finally:
        sock.close()


# ------------------------------------------------ a busy gateway, healthy engines


def test_a_blocked_gateway_loop_does_not_declare_a_working_engine_dead(run_dir):
    """The gateway's own loop held up for longer than the engine timeout (its CPU
    saturated) while an engine streams: the stream goes on whole."""
    endpoint = f"ipc://{run_dir}/synthetic-busy"
    engine = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"),
                               "--endpoint", endpoint, "--step-ms", "10"], env=child_env())

    async def scenario() -> str:
        client = EngineClient([endpoint], engine_timeout_s=1.0)
        await client.start()
        try:
            assert await client.wait_ready(30)
            gen = Generate("r1", TextPrompt("x"), SamplingParams(max_tokens=300), model="synthetic")
            stream = client.submit([gen])
            text = []
            first = await stream.next()
            text += [d.text for d in first]
            time.sleep(2.5)  # the loop blocked: no heartbeat, no reading, for 2.5 engine timeouts
            while (batch := await stream.next()) is not None:
                text += [d.text for d in batch]
            return "".join(text)
        finally:
            await client.close()

    try:
        assert asyncio.run(scenario()) == ("0123456789" * 30)
    finally:
        engine.kill()
        engine.wait()


# ----------------------------------------------------- engines beyond this host


NETNS = "vgw-test"


@pytest.fixture()
def remote_engine(run_dir):
    """A synthetic engine on another (simulated) host: a network namespace of the
    test's own, joined to this one by a veth pair (10.213.7.1 here, .2 there)."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "del", "vgw-host"], capture_output=True)
    ip("netns", "add", NETNS)
    ip("link", "add", "vgw-host", "type", "veth", "peer", "name", "vgw-peer")
    ip("link", "set", "vgw-peer", "netns", NETNS)
    ip("addr", "add", "10.213.7.1/30", "dev", "vgw-host")
    ip("link", "set", "vgw-host", "up")
    ip("netns", "exec", NETNS, "ip", "addr", "add", "10.213.7.2/30", "dev", "vgw-peer")
    ip("netns", "exec", NETNS, "ip", "link", "set", "vgw-peer", "up")
    ip("netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
    endpoint = f"tcp://10.213.7.2:{free_port()}"
    engine = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable,
                               str(ROOT / "benchmarks" / "synthetic_engine.py"), "--endpoint", endpoint],
                              env=child_env())
    try:
        yield endpoint
    finally:
        engine.kill()
        engine.wait()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        subprocess.run(["ip", "link", "del", "vgw-host"], capture_output=True)


def test_plaintext_to_an_engine_on_another_host_only_when_allowed(remote_engine, run_dir):
    port = free_port()
    cmd = ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", remote_engine]
    r = subprocess.run([sys.executable, "-m", *cmd], env=child_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "refusing to talk plaintext to " + remote_engine in r.stderr, r.stderr
    gateway = Proc("gateway-plaintext-allowed", cmd, child_env(ENGINE_ALLOW_PLAINTEXT="1"), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [gateway], 60)
        r = httpx.post(url + "/v1/completions", json={"model": "synthetic", "prompt": "x", "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "01234"
    finally:
        gateway.stop()


# ------------------------------------------------- failover, synthetic engines


def test_failover_between_two_synthetic_engines(run_dir):
    """Two protocol-speaking engines; one killed mid-stream: its streams fail with
    engine_unavailable within a second, the other's finish whole, and new requests
    go to the survivor."""
    endpoints = [f"ipc://{run_dir}/synthetic-{i}" for i in range(2)]
    engines = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"),
                                 "--endpoint", ep, "--step-ms", "20"], env=child_env()) for ep in endpoints]
    port = free_port()
    gateway = Proc("synthetic-gateway", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints",
                                         ",".join(endpoints)], child_env(), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [gateway], 60)
        while not all(e["ready"] for e in httpx.get(url + "/health").json()["engines"]):
            time.sleep(0.05)
        results: list[tuple[str, str, float]] = []  # (outcome, text, when)

        def stream() -> None:
            text = []
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": "synthetic", "prompt": "x", "max_tokens": 200, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            results.append((event["error"]["type"], "".join(text), time.monotonic()))
                            return
                        text.append(event["choices"][0]["text"])
            results.append(("ok", "".join(text), time.monotonic()))

        threads = [threading.Thread(target=stream) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # every stream under way (200 tokens take 4 s)
        in_flight = [e["in_flight"] for e in httpx.get(url + "/health").json()["engines"]]
        assert in_flight == [3, 3], in_flight
        killed = time.monotonic()
        engines[0].send_signal(signal.SIGKILL)
        for t in threads:
            t.join(30)
        failed = [r for r in results if r[0] != "ok"]
        ok = [r for r in results if r[0] == "ok"]
        assert len(failed) == 3 and all(r[0] == "engine_unavailable" and r[2] - killed < 1.0 for r in failed), failed
        assert len(ok) == 3 and all(r[1] == ("0123456789" * 20) for r in ok)
        r = httpx.post(url + "/v1/completions", json={"model": "synthetic", "prompt": "x", "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "01234"
    finally:
        gateway.stop()
        for e in engines:
            e.kill()
            e.wait()
