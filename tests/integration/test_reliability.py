"""A replica that sheds honestly, notices a stuck engine and loses nothing, with
real vLLM engines: the request cap in front of the shared engine, and a `serve`
box of two LoRA-capable engines (adapters all or none, confined to LORA_ROOT,
loaded again on a restarted engine; an engine whose vLLM core is stopped, and
one whose own loop is stopped)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from support import (
    ENGINE_START_TIMEOUT_S,
    MODEL,
    Proc,
    Stream,
    child_env,
    engine_socket,
    free_port,
    health,
    make_adapter,
    wait_healthy,
    wait_idle,
    wait_until,
)
from vllm_gateway.protocol.messages import FailureKind, LoadAdapter, RequestFailed, decode_engine_message, encode


def test_the_cap_in_front_of_a_real_engine(engine_endpoint, run_dir, gateway_url):  # gateway_url: the engine is up
    endpoint, _ = engine_endpoint
    port = free_port()
    proc = Proc("gateway-capped", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints",
                                   endpoint], child_env(MAX_CONCURRENT_REQUESTS="1"), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], 60)
        long = Stream(url, 400)
        wait_until(lambda: health(url)[1]["engines"][0]["in_flight"] == 1, 60, "the stream under way", proc)
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        long.join(300)
        assert long.intact
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.stop()
    assert wait_idle(endpoint)


def test_the_engine_itself_refuses_run_time_adapters_when_not_allowed(engine_endpoint):
    """A peer that reaches the engine's socket directly, past the gateway, is held
    to VLLM_ALLOW_RUNTIME_LORA_UPDATING too (the shared engine runs without it)."""
    endpoint, _ = engine_endpoint
    with engine_socket(endpoint) as sock:
        sock.send(encode(LoadAdapter("direct-1", "sneaky", "/tmp")))
        deadline = time.monotonic() + 10
        answer = None
        while time.monotonic() < deadline and answer is None:
            if sock.poll(500):
                msg = decode_engine_message(sock.recv())
                if isinstance(msg, RequestFailed) and msg.request_id == "direct-1":
                    answer = msg
    assert answer is not None and answer.kind == FailureKind.NOT_FOUND
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in answer.message


# ------------------------------------------------------------ a box of two engines


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory):
    """Adapters under P/sub: engine 0 may load from P, engine 1 from P/sub only,
    so the relative path `sub/a` is an adapter to engine 0 and nothing to engine 1."""
    root = tmp_path_factory.mktemp("lora-root")
    make_adapter(root / "sub" / "a", 3)
    return root


@pytest.fixture(scope="module")
def box(run_dir, lora_root, gateway_url):  # gateway_url: start after the shared engine, not beside it
    port = free_port()
    env = child_env(
        NUM_ENGINES="2", MAX_MODEL_LEN="1024", ENABLE_LORA="1", MAX_LORA_RANK="8", MAX_LORAS="2",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", ENGINE_0_LORA_ROOT=str(lora_root),
        ENGINE_1_LORA_ROOT=str(lora_root / "sub"), ENGINE_STALL_TIMEOUT_S="6", ENGINE_TIMEOUT_S="3",
    )
    proc = Proc("serve-reliability", ["vllm_gateway.gateway", "serve", "--port", str(port)], env, run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], ENGINE_START_TIMEOUT_S)
        yield url, proc
    finally:
        proc.stop()


def both_ready(url: str, proc: Proc) -> list[dict]:
    return wait_until(lambda: (lambda s, h: s == 200 and len(h["engines"]) == 2 and all(
        e["ready"] for e in h["engines"]) and h["engines"])(*health(url)), ENGINE_START_TIMEOUT_S,
        "both engines ready", proc)


def test_adapters_outside_lora_root_are_refused_alike(box, lora_root):
    url, proc = box
    both_ready(url, proc)
    answers = [httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": f"out{i}", "lora_path": path},
                          timeout=60) for i, path in enumerate(["/etc", "/no/such/folder", "../../etc"])]
    assert {r.status_code for r in answers} == {400}
    assert {r.json()["error"]["message"] for r in answers} == {"lora_path must be inside LORA_ROOT"}


def test_an_adapter_is_loaded_on_all_engines_or_none(box, lora_root):
    url, proc = box
    both_ready(url, proc)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": "sub/a"}, timeout=120)
    assert r.status_code == 400, r.text  # engine 1 cannot: engine 0 let it go again
    engines = both_ready(url, proc)
    assert all("half" not in e["models"] for e in engines), engines
    assert "half" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]


def test_a_restarted_engine_gets_the_run_time_adapters_again(box, lora_root):
    url, proc = box
    both_ready(url, proc)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "kept", "lora_path": str(lora_root / "sub" / "a")},
                   timeout=120)
    assert r.status_code == 200, r.text
    engines = both_ready(url, proc)
    assert all("kept" in e["models"] for e in engines), engines
    victim = engines[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (lambda e: e["ready"] and e["pid"] != victim and "kept" in e["models"])(
        health(url)[1]["engines"][1]), ENGINE_START_TIMEOUT_S, "engine 1 back, with the adapter", proc)
    r = httpx.post(url + "/v1/completions", json={"model": "kept", "prompt": "Hi", "max_tokens": 3}, timeout=120)
    assert r.status_code == 200, r.text


def _engine_of_stream(url: str, proc: Proc) -> dict:
    return wait_until(lambda: next((e for e in health(url)[1]["engines"] if e["in_flight"]), None), 120,
                      "the stream on an engine", proc)


def test_an_engine_whose_vllm_core_is_stopped_is_stalled_failed_and_replaced(box):
    url, proc = box
    both_ready(url, proc)
    stream = Stream(url, 900)
    engine = _engine_of_stream(url, proc)
    wait_until(lambda: stream.tokens >= 3, 120, "tokens flowing", proc)
    core = next(p for p in psutil.Process(engine["pid"]).children(recursive=True)
                if p.name().startswith("VLLM::EngineCor"))
    core.send_signal(signal.SIGSTOP)  # vLLM's core hangs; the engine's own loop still answers
    stopped = time.monotonic()
    try:
        stream.join(60)
        assert stream.failed, stream.events[-3:]
        error = next(e for e in stream.events if isinstance(e, dict) and "error" in e)["error"]
        assert error["type"] == "engine_unavailable" and "stalled" in error["message"]
        assert stream.error_at - stopped < 6 + 4  # ENGINE_STALL_TIMEOUT_S, and a status tick or two
        # out of routing at once; the stopped core is killed with its group; the engine replaced
        wait_until(lambda: not core.is_running() or core.status() == psutil.STATUS_ZOMBIE, 30, "the core gone", proc)
        index = next(i for i, e in enumerate(health(url)[1]["engines"]) if e["endpoint"] == engine["endpoint"])
        wait_until(lambda: (lambda e: e["ready"] and e["pid"] != engine["pid"])(health(url)[1]["engines"][index]),
                   ENGINE_START_TIMEOUT_S, "the stalled engine replaced", proc)
    finally:
        if core.is_running():
            core.send_signal(signal.SIGCONT)


def test_an_engine_loop_held_up_fails_its_requests_and_then_aborts_them(box):
    """The engine's own loop stopped for longer than ENGINE_TIMEOUT_S: the gateway
    fails its requests; when the engine runs again, it stops generating them."""
    url, proc = box
    both_ready(url, proc)
    stream = Stream(url, 900)
    engine = _engine_of_stream(url, proc)
    wait_until(lambda: stream.tokens >= 3, 120, "tokens flowing", proc)
    adapter = psutil.Process(engine["pid"])
    adapter.send_signal(signal.SIGSTOP)
    try:
        stream.join(30)
        assert stream.failed and "stopped answering" in str(stream.events[-2])
    finally:
        adapter.send_signal(signal.SIGCONT)
    index = next(i for i, e in enumerate(health(url)[1]["engines"]) if e["endpoint"] == engine["endpoint"])
    # back: the engine learns of the aborts and runs nothing, well before 900 tokens would be done
    wait_until(lambda: (lambda e: e["ready"] and e["running"] + e["waiting"] == 0)(health(url)[1]["engines"][index]),
               20, "the failed request aborted on the engine", proc)
