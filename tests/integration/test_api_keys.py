"""API keys: a second real gateway, with keys, in front of the shared engine."""

import anthropic
import httpx
import openai
import pytest

from support import MODEL, Proc, child_env, free_port, wait_healthy

ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def keyed(engine_endpoint, run_dir, gateway_url):  # gateway_url: the shared engine is ready
    key_file = run_dir / "keys.txt"
    key_file.write_text("# operators' keys\nfile-key-3\n\n")
    port = free_port()
    proc = Proc("gateway-keys", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints",
                                 engine_endpoint[0]],
                child_env(API_KEY="key-1, key-2", VLLM_API_KEY="vllm-key", API_KEY_FILE=str(key_file)), run_dir)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [proc], 60)
    yield url, proc
    proc.stop()


def test_keys_accepted_missing_and_wrong(keyed):
    url, proc = keyed
    for key in ("key-1", "key-2", "vllm-key", "file-key-3"):
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1).usage.completion_tokens == 1
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="key-", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("Missing API key")
    for path in ("/tokenize", "/version", "/v1/responses/x", "/openapi.json"):
        assert httpx.get(url + path).status_code == 401, path
    # probes and scrapers need no key
    for path in ("/health", "/ping", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    proc.stop()  # flush the log: no key in it, right or wrong
    log = proc.log_path.read_text()
    assert not any(k in log for k in ("key-1", "key-2", "vllm-key", "file-key-3"))


def test_anthropic_clients_use_x_api_key(engine_endpoint, run_dir, gateway_url):
    port = free_port()
    proc = Proc("gateway-keys-anthropic", ["vllm_gateway.gateway", "http", "--port", str(port),
                                           "--engine-endpoints", engine_endpoint[0]],
                child_env(API_KEY="secret-a"), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], 60)
        ok = anthropic.Anthropic(base_url=url, api_key="secret-a", max_retries=0)
        assert ok.messages.create(model=MODEL, max_tokens=1, messages=ASK).usage.output_tokens == 1
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="secret-b", max_retries=0).messages.create(
                model=MODEL, max_tokens=1, messages=ASK)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    finally:
        proc.stop()
