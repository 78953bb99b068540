"""Several models behind one gateway and one key: `vllm-gateway serve` with two
engines, a chat engine (SmolLM2, with a LoRA adapter made here with `peft`) and an
embedding engine (the packaged all-MiniLM-L6-v2), configured per engine by
`ENGINE_<i>_<VAR>` variables, behind API_KEY."""

from __future__ import annotations

import base64
import math
import struct
import time

import httpx
import openai
import pytest

from support import ENGINE_START_TIMEOUT_S, MODEL, Proc, child_env, free_port, make_adapter, wait_healthy

EMBEDDER = "all-MiniLM-L6-v2"
KEY = "box-key"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(root / "a", 1), make_adapter(root / "b", 2)


@pytest.fixture(scope="module")
def box(run_dir, adapters, gateway_url):  # gateway_url: start after the shared engine, not beside it
    port = free_port()
    env = child_env(
        NUM_ENGINES="2", API_KEY=KEY, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
        ENGINE_0_ENABLE_LORA="1", ENGINE_0_MAX_LORA_RANK="8", ENGINE_0_MAX_LORAS="2",
        ENGINE_0_LORA_MODULES=f"french={adapters[0]}",
        ENGINE_1_ENGINE_TASK="embed", ENGINE_1_MAX_MODEL_LEN="256",
    )
    proc = Proc("serve-models", ["vllm_gateway.gateway", "serve", "--port", str(port)], env, run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], ENGINE_START_TIMEOUT_S)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S  # /health is 200 once one engine is ready
        while time.monotonic() < deadline:
            listed = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
            if len(listed.get("data", [])) == 3:
                break
            assert proc.alive(), proc.tail()
            time.sleep(0.5)
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def c(box):
    return openai.OpenAI(base_url=box + "/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(c, model: str) -> str:
    """A greedy answer open enough for an adapter to change (the capital of
    France, asked as a chat, is answered alike by any of them)."""
    story = [{"role": "user", "content": "Tell me a story about a cat."}]
    return c.chat.completions.create(model=model, messages=story, max_tokens=16, temperature=0).choices[0].message.content


def test_models_listed_with_adapters_and_embedder(c):
    models = {m.id: m for m in c.models.list()}
    assert set(models) == {MODEL, "french", EMBEDDER}
    assert models["french"].model_extra["parent"] == MODEL and models[MODEL].model_extra["parent"] is None
    assert models[EMBEDDER].model_extra["max_model_len"] == 256


def test_adapter_changes_the_answer(c):
    base, adapted = greedy(c, MODEL), greedy(c, "french")
    assert adapted != base
    assert greedy(c, "french") == adapted  # and deterministically so


def test_adapters_loaded_and_unloaded_at_run_time(c, box, adapters):
    h = httpx.Client(base_url=box, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": adapters[1]})
    assert r.status_code == 200 and "second" in r.text, r.text
    assert "second" in {m.id for m in c.models.list()}
    assert greedy(c, "second") != greedy(c, MODEL)
    again = h.post("/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": adapters[1]})
    assert again.status_code == 400
    bad = h.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "second"}).status_code == 200
    assert "second" not in {m.id for m in c.models.list()}
    with pytest.raises(openai.NotFoundError) as e:
        greedy(c, "second")
    assert "french" in e.value.body["message"]  # names what is served
    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "second"}).status_code == 404


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(unit(a), unit(b)))


def test_embeddings_from_the_real_minilm(c):
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    r = c.embeddings.create(model=EMBEDDER, input=texts)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)  # MiniLM normalises
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert r.usage.prompt_tokens == r.usage.total_tokens > 10 and r.model == EMBEDDER
    # base64: little-endian float32, as OpenAI encodes them
    b = c.embeddings.create(model=EMBEDDER, input=texts[0], encoding_format="base64")
    raw = base64.b64decode(b.data[0].embedding) if isinstance(b.data[0].embedding, str) else None
    decoded = list(struct.unpack("<384f", raw)) if raw else b.data[0].embedding
    assert max(abs(x - y) for x, y in zip(decoded, vectors[0])) < 1e-5
    # token ids, and the embedding model named by default
    ids = httpx.post(str(c.base_url).replace("/v1/", "") + "/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": EMBEDDER, "prompt": texts[0]}).json()["tokens"]
    t = c.embeddings.create(model=EMBEDDER, input=[ids])
    assert max(abs(x - y) for x, y in zip(t.data[0].embedding, vectors[0])) < 1e-5
    unnamed = httpx.post(str(c.base_url) + "embeddings", headers={"Authorization": f"Bearer {KEY}"},
                         json={"input": "no model named"}, timeout=60)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == EMBEDDER


def test_each_request_goes_to_the_engine_of_its_model(c):
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model=MODEL, input="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=EMBEDDER, messages=ASK, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=ASK, max_tokens=2)
    assert all(name in e.value.body["message"] for name in (MODEL, "french", EMBEDDER))
    # no model named: the chat model, as before
    r = httpx.post(str(c.base_url) + "chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": ASK, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_one_key_for_the_box(box):
    assert httpx.get(box + "/v1/models").status_code == 401
    assert httpx.get(box + "/health").status_code == 200


def test_runpod_worker_serves_the_models_and_worker_vllms_embedding_input(box, run_dir):
    """A RunPod worker in front of the same two engines: embeddings by
    worker-vllm's `{"input": ...}`, an adapter by name; RunPod's own auth, no key."""
    from support.runpod_queue import JobQueue

    endpoints = [e["endpoint"] for e in httpx.get(box + "/health").json()["engines"]]
    queue = JobQueue()
    cwd = run_dir / "runpod-models"
    cwd.mkdir(exist_ok=True)
    env = child_env(ENGINE_ENDPOINTS=",".join(endpoints), API_KEY="ignored-here", **queue.env())
    worker = Proc("runpod-models", ["vllm_gateway.gateway", "runpod"], env, run_dir, cwd=cwd)
    try:
        _, result = queue.run({"input": ["A man is playing a guitar.", "Someone plays an instrument."]}, 120)
        [out] = result["output"]
        assert out["model"] == EMBEDDER and [len(d["embedding"]) for d in out["data"]] == [384, 384]
        body = {"model": "french", "messages": [{"role": "user", "content": "Tell me a story about a cat."}],
                "max_tokens": 16, "temperature": 0}
        _, result = queue.run({"openai_route": "/v1/chat/completions", "openai_input": body}, 120)
        assert result["output"][0]["model"] == "french"
    finally:
        worker.stop()
        queue.close()
