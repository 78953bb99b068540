"""Integration: engine slots are freed when clients leave; `vllm-gateway serve`
starts, serves and stops cleanly."""

import signal
import time

import httpx
import openai
import psutil
import pytest

from support import MODEL, Proc, child_env, engine_running, engine_socket, free_port, wait_healthy, wait_idle


def test_client_disconnect_mid_stream_frees_engine(gateway_url, engine_endpoint):
    endpoint, _ = engine_endpoint
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", gateway_url + "/v1/completions", json=body) as r:
            it = r.iter_lines()
            got = [line for _, line in zip(range(6), it) if line]
            assert got and got[0].startswith("data: ")
            assert engine_running(endpoint) >= 1
    assert wait_idle(endpoint), "engine still running the abandoned request"


def test_serve_command_end_to_end(run_dir):
    """`vllm-gateway serve` as a RunPod load-balancing endpoint runs it (PORT, and
    /ping on PORT_HEALTH: 204 while the model loads, 200 once ready), with
    worker-vllm's naming settings: served-name override, response role and a
    custom chat template (which drops SmolLM2's long system prompt)."""
    port, health_port = free_port(), free_port()
    env = child_env(OPENAI_SERVED_MODEL_NAME_OVERRIDE="smol-test", OPENAI_RESPONSE_ROLE="bot",
                    CUSTOM_CHAT_TEMPLATE="{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
                    PORT=str(port), PORT_HEALTH=str(health_port))
    proc = Proc("serve", ["vllm_gateway.gateway", "serve", "--max-model-len", "1024"], env, run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        pings: list[int] = []
        deadline = time.monotonic() + 600
        while (not pings or pings[-1] != 200) and time.monotonic() < deadline:
            assert proc.alive(), proc.tail()
            try:
                pings.append(httpx.get(f"http://127.0.0.1:{health_port}/ping", timeout=2).status_code)
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.1)
        assert pings and 204 in pings and pings[-1] == 200, pings
        assert set(pings) <= {204, 200}, pings
        wait_healthy(url, [proc], 60)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        models = c.models.list().data
        assert [m.id for m in models] == ["smol-test"] and models[0].max_model_len == 1024
        r = c.chat.completions.create(model="smol-test", messages=[{"role": "user", "content": "Hi there"}], max_tokens=5)
        assert r.usage.completion_tokens > 0 and r.choices[0].message.role == "bot"
        assert r.usage.prompt_tokens <= 4  # "Hi there\n" alone, no system prompt
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    finally:
        code = proc.stop(signal.SIGTERM, timeout=60)
    assert code == 0, proc.tail()
    assert "Traceback" not in proc.log_path.read_text(), proc.tail(100)


def test_client_disconnect_while_waiting_non_streaming_frees_engine(gateway_url, engine_endpoint):
    endpoint, _ = engine_endpoint
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway_url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=2))
    assert wait_idle(endpoint), "engine still running the abandoned request"


def test_request_timeout_aborts_the_engine_request(engine_endpoint, run_dir):
    endpoint, engine = engine_endpoint
    port = free_port()
    proc = Proc("gateway-timeout", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint],
                child_env(REQUEST_TIMEOUT_S="1.5"), run_dir)
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1500, "ignore_eos": True}
    try:
        wait_healthy(url, [proc, engine], 600)
        start = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert time.monotonic() - start < 10
        assert wait_idle(endpoint), "engine still running the timed-out request"
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and '"request_timeout"' in lines[-2], lines[-3:]
        assert wait_idle(endpoint)
    finally:
        proc.stop()


def test_stream_interval_batches_tokens_into_fewer_events(engine_endpoint, run_dir):
    """STREAM_INTERVAL_MS: at most one write per interval, what the engine produced
    meanwhile merged into one chunk; every token still arrives, usage exact."""
    endpoint, engine = engine_endpoint
    port = free_port()
    proc = Proc("gateway-interval", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint],
                child_env(STREAM_INTERVAL_MS="400"), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc, engine], 600)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chunks = list(c.completions.create(model=MODEL, prompt="Count:", max_tokens=60, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        texts = [ch.choices[0].text for ch in chunks if ch.choices]
        assert chunks[-1].usage.completion_tokens == 60
        assert len(texts) < 60, len(texts)  # several tokens per event
        assert "".join(texts).strip()
        assert chunks[-2].choices[0].finish_reason == "length"
    finally:
        proc.stop()


@pytest.mark.parametrize("command", ["serve", "runpod"])
def test_sigterm_while_engines_load_is_a_normal_stop(run_dir, command):
    """A stop that comes while the engines are still loading exits 0 at once and
    leaves no engine (nor vLLM process) behind."""
    args = ["vllm_gateway.gateway", command] + (["--port", str(free_port())] if command == "serve" else [])
    proc = Proc(f"{command}-stopped-loading", args, child_env(), run_dir)
    deadline = time.monotonic() + 60
    engines: list[psutil.Process] = []
    while not any(_named(p, "VLLM::EngineCor") for p in engines):  # vLLM is loading the model
        assert proc.alive() and time.monotonic() < deadline, proc.tail()
        time.sleep(0.2)
        engines = psutil.Process(proc.popen.pid).children(recursive=True)
    started = time.monotonic()
    assert proc.stop(signal.SIGTERM, timeout=60) == 0, proc.tail()
    assert time.monotonic() - started < 30
    _, alive = psutil.wait_procs(engines, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def _named(p: psutil.Process, prefix: str) -> bool:
    try:
        return p.name().startswith(prefix)
    except psutil.Error:
        return False


def test_engine_refuses_the_requests_of_a_gateway_of_another_version(engine_endpoint):
    import msgspec

    from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus, Generate, Outputs, SamplingParams, TextPrompt
    from vllm_gateway.protocol.messages import decode_engine_message, encode

    endpoint, _ = engine_endpoint
    with engine_socket(endpoint) as sock:
        sock.send(msgspec.msgpack.encode(["hello", "a-version-1-gateway"]))  # no version field: version 1
        assert sock.poll(5000)
        status = decode_engine_message(sock.recv())
        assert isinstance(status, EngineStatus) and status.protocol_version == PROTOCOL_VERSION
        sock.send(encode(Generate("old-1", TextPrompt("Hi"), SamplingParams(max_tokens=5))))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if sock.poll(200):
                msg = decode_engine_message(sock.recv())
                assert not isinstance(msg, Outputs), msg  # refused: nothing generated for it
        assert engine_running(endpoint) == 0


def test_engine_refuses_a_value_vllm_refuses(run_dir):
    """Any vLLM engine argument may come from its variable; one vLLM's own parser
    refuses stops the engine at start-up (exit 2), naming the variable."""
    proc = Proc("engine-bad-vllm-arg", ["vllm_gateway.engine", "--endpoint", f"ipc://{run_dir}/bad-arg"],
                child_env(SCHEDULING_POLICY="random"), run_dir)
    try:
        assert proc.popen.wait(180) == 2
    finally:
        proc.stop()
    assert "SCHEDULING_POLICY='random'" in proc.tail()
