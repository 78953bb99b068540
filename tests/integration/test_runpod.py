"""Integration: the RunPod worker under the real RunPod SDK worker loop (production
mode), fed by a local job queue, against the real shared engine."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from support import MODEL, Proc, child_env, engine_running, free_port, wait_idle
from support.runpod_queue import JobQueue

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MAX_CONCURRENCY = 3


def start_worker(name: str, queue: JobQueue, endpoint: str, run_dir, **env: str) -> Proc:
    cwd = run_dir / name
    cwd.mkdir(exist_ok=True)  # the SDK keeps a job-state file in its working directory
    e = child_env(ENGINE_ENDPOINTS=endpoint, MAX_CONCURRENCY=str(MAX_CONCURRENCY), **queue.env())
    e.update(env)
    return Proc(name, ["vllm_gateway.gateway", "runpod"], e, run_dir, cwd=cwd)


@pytest.fixture(scope="module")
def queue(gateway_url):  # gateway_url: the shared engine is up and ready
    q = JobQueue()
    yield q
    q.close()


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def worker(queue, engine_endpoint, run_dir):
    endpoint, _ = engine_endpoint
    proc = start_worker("runpod-worker", queue, endpoint, run_dir, METRICS_PORT=str(METRICS_PORT))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def list_worker(engine_endpoint, run_dir, gateway_url):
    """A second worker with RAW_OPENAI_OUTPUT=0, on its own queue."""
    q = JobQueue()
    proc = start_worker("runpod-worker-lists", q, engine_endpoint[0], run_dir, RAW_OPENAI_OUTPUT="0")
    yield q, proc
    proc.stop()
    q.close()


def run(queue: JobQueue, worker: Proc, job_input: dict, timeout: float = 120) -> tuple[list, dict]:
    assert worker.alive(), worker.tail()
    try:
        return queue.run(job_input, timeout)
    except TimeoutError:
        raise AssertionError(worker.tail()) from None


def events(batch: str) -> list[str]:
    """The SSE events of one raw batch; each must be whole."""
    assert batch.endswith("\n\n"), batch
    parts = batch[:-2].split("\n\n")
    assert all(p.startswith("data: ") for p in parts), batch
    return [p[len("data: "):] for p in parts]


def assert_growing_sizes(sizes: list[int], expected_prefix: list[int]) -> None:
    """Every batch but the last has the next size of the schedule; the last at most."""
    assert sizes[:-1] == expected_prefix[: len(sizes) - 1], sizes
    assert 0 < sizes[-1] <= expected_prefix[len(sizes) - 1], sizes


def job_error(result: dict) -> dict:
    assert "error" in result, result
    return json.loads(result["error"])["error"]


# --------------------------------------------------------------------- OpenAI mode


def test_openai_chat_stream_raw_sse_batches(queue, worker, client):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 60, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    outputs, result = run(queue, worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert all(isinstance(o, str) for o in outputs)
    assert result["output"] == outputs  # return_aggregate_stream: the job's output is every batch
    batches = [events(o) for o in outputs]
    assert batches[-1][-1] == "[DONE]" and all("[DONE]" not in e for b in batches[:-1] for e in b)
    sizes = [len(b) for b in batches]
    sizes[-1] -= 1  # [DONE] rides with the last batch
    assert_growing_sizes(sizes, [1, 3, 9, 27, 50, 50, 50])
    chunks = [json.loads(e) for b in batches for e in b if e != "[DONE]"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 60
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=60, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content
    assert chunks[-1]["usage"]["prompt_tokens"] == whole.usage.prompt_tokens


def test_openai_chat_non_stream(queue, worker):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 30, "temperature": 0}
    outputs, result = run(queue, worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    [response] = result["output"]
    assert response["object"] == "chat.completion"
    assert "Paris" in response["choices"][0]["message"]["content"]
    assert response["usage"]["total_tokens"] == response["usage"]["prompt_tokens"] + response["usage"]["completion_tokens"]


def test_openai_completion_stream_n2(queue, worker):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "n": 2, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    outputs, result = run(queue, worker, {"openai_route": "/v1/completions", "openai_input": body})
    chunks = [json.loads(e) for o in outputs for e in events(o) if e != "[DONE]"]
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_openai_models(queue, worker):
    for job_input in ({"openai_route": "/v1/models"}, {"openai_route": "/v1/models", "openai_input": {}}):
        _, result = run(queue, worker, job_input)
        [models] = result["output"]
        assert [m["id"] for m in models["data"]] == [MODEL]


def test_openai_stream_as_chunk_lists(list_worker):
    q, _ = list_worker
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 16, "stream": True, "ignore_eos": True}
    outputs, result = q.run({"openai_route": "/v1/completions", "openai_input": body})
    assert all(isinstance(o, list) for o in outputs) and outputs
    assert_growing_sizes([len(o) for o in outputs], [1, 3, 9, 27, 50])
    chunks = [c for o in outputs for c in o]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_raw_batches_never_split_characters(queue, worker):
    body = {"model": MODEL, "max_tokens": 40, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Écris une phrase en français avec des accents: é, è, à, ç."}]}
    outputs, _ = run(queue, worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for o in outputs for e in events(o) if e != "[DONE]")
    assert any(ord(ch) > 127 for ch in text), text
    assert "\ufffd" not in text and all("\ufffd" not in o for o in outputs)


def test_openai_tool_call_stream_in_whole_events(queue, worker, client):
    """A named tool call streamed through RunPod's batches: every batch holds whole
    SSE events, and the pieces reassemble to the non-streamed call."""
    from support import ASK, WEATHER

    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": MODEL, "messages": ASK, "max_tokens": 60, "temperature": 0, "tools": [WEATHER],
            "tool_choice": choice, "stream": True}
    outputs, _ = run(queue, worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    chunks = [json.loads(e) for o in outputs for e in events(o) if e != "[DONE]"]
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in c["choices"][0]["delta"].get("tool_calls", []) if c["choices"] else []:
            call = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
            call["name"] = call["name"] or tc.get("function", {}).get("name")
            call["arguments"] += tc.get("function", {}).get("arguments") or ""
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                           tools=[WEATHER], tool_choice=choice)
    [ref] = whole.choices[0].message.tool_calls
    assert list(calls.values()) == [{"name": "get_weather", "arguments": ref.function.arguments}]
    assert json.loads(ref.function.arguments).keys() == {"city"}


def test_openai_structured_output_and_tokenize(queue, worker):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 20, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}
    _, result = run(queue, worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    [response] = result["output"]
    assert json.loads(response["choices"][0]["message"]["content"]).keys() == {"ok"}
    _, result = run(queue, worker, {"openai_route": "/tokenize", "openai_input": {"prompt": "Hello world"}})
    [tokens] = result["output"]
    assert tokens["count"] == 2
    _, result = run(queue, worker, {"openai_route": "/detokenize", "openai_input": {"tokens": tokens["tokens"]}})
    assert result["output"] == [{"prompt": "Hello world"}]


def test_standard_structured_outputs_and_guided_names(queue, worker):
    for sp in ({"structured_outputs": {"regex": "[0-9]{4}"}}, {"guided_regex": "[0-9]{4}"}):
        _, result = run(queue, worker, {"prompt": "The year is", "sampling_params": {"max_tokens": 10, **sp}})
        [out] = result["output"]
        assert len(out["choices"][0]["tokens"][0]) == 4 and out["choices"][0]["tokens"][0].isdigit(), out
    _, result = run(queue, worker, {"prompt": "x", "sampling_params": {"guided_regex": "[0-9"}})
    assert job_error(result)["param"] == "guided_regex"


def test_responses_and_messages_through_openai_route(queue, worker):
    """Both typed-event APIs stream whole events per batch; their text joins to the
    non-streamed answer; a stored response is reachable by the generic route input."""
    body = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 200, "temperature": 0}
    _, result = run(queue, worker, {"openai_route": "/v1/responses", "openai_input": body})
    [whole] = result["output"]
    assert whole["object"] == "response" and whole["status"] == "completed"
    outputs, _ = run(queue, worker, {"openai_route": "/v1/responses", "openai_input": {**body, "stream": True}})
    evs = [e for o in outputs for e in o.split("\n\n") if e]
    assert all(e.startswith("event: response.") for e in evs), evs[:3]
    data = [json.loads(e.split("data: ", 1)[1]) for e in evs]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == whole["output_text"]
    assert data[-1]["type"] == "response.completed"
    stored = run(queue, worker, {"route": f"/v1/responses/{whole['id']}", "method": "GET"})[1]["output"]
    assert stored == [whole]
    # a background response's events, replayed from a sequence number on (a GET's query in the body)
    _, result = run(queue, worker, {"openai_route": "/v1/responses", "openai_input": {
        **body, "max_output_tokens": 12, "background": True}})
    rid = result["output"][0]["id"]
    outputs, _ = run(queue, worker, {"route": f"/v1/responses/{rid}", "method": "GET",
                                     "body": {"stream": True, "starting_after": 2}})
    evs = [e for o in outputs for e in o.split("\n\n") if e]
    data = [json.loads(e.split("data: ", 1)[1]) for e in evs]
    assert [d["sequence_number"] for d in data] == list(range(3, 3 + len(data)))
    assert data[-1]["type"] in ("response.completed", "response.incomplete")

    msg = {"model": MODEL, "max_tokens": 30, "temperature": 0,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    _, result = run(queue, worker, {"route": "/v1/messages", "method": "POST", "body": msg})
    [message] = result["output"]
    assert message["type"] == "message" and message["content"][0]["type"] == "text"
    outputs, _ = run(queue, worker, {"openai_route": "/v1/messages", "openai_input": {**msg, "stream": True}})
    evs = [e for o in outputs for e in o.split("\n\n") if e]
    data = [json.loads(e.split("data: ", 1)[1]) for e in evs]
    assert data[0]["type"] == "message_start" and data[-1]["type"] == "message_stop"
    text = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
    assert text == message["content"][0]["text"]
    _, result = run(queue, worker, {"openai_route": "/v1/messages", "openai_input": {"model": MODEL, "messages": []}})
    err = json.loads(result["error"])
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"


def test_generic_route_input_reaches_every_route(queue, worker):
    for method, route, body, check in [
        ("GET", "/v1/models", None, lambda o: o["data"][0]["id"] == MODEL),
        ("POST", "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 3}, lambda o: o["object"] == "chat.completion"),
        ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, lambda o: o["object"] == "text_completion"),
        ("POST", "/tokenize", {"prompt": "Hello world"}, lambda o: o["count"] == 2),
        ("POST", "/v1/messages/count_tokens", {"messages": FRANCE}, lambda o: o["input_tokens"] > 5),
        ("GET", "/version", None, lambda o: o["version"]),
        ("GET", "/health", None, lambda o: o["status"] == "ok"),
    ]:
        job = {"route": route, "method": method, **({"body": body} if body is not None else {})}
        _, result = run(queue, worker, job)
        assert "output" in result and check(result["output"][0]), (route, result)
    _, result = run(queue, worker, {"route": "/v1/nothing", "method": "POST", "body": {}})
    assert job_error(result)["code"] == "unknown_route"


# ------------------------------------------------------------------- standard mode


def test_standard_prompt_stream_custom_batches_exact_usage(queue, worker, client):
    prompt = "The history of the Roman Empire"
    job = {"prompt": prompt, "stream": True, "min_batch_size": 2, "batch_size_growth_factor": 2,
           "max_batch_size": 10, "sampling_params": {"max_tokens": 40, "ignore_eos": True, "temperature": 0}}
    outputs, result = run(queue, worker, job)
    sizes = [len(o["choices"][0]["tokens"]) for o in outputs]
    assert_growing_sizes(sizes, [2, 4, 8, 10, 10, 10, 10])
    assert [o["usage"]["output"] for o in outputs] == [sum(sizes[: i + 1]) for i in range(len(sizes))]
    ref = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert outputs[-1]["usage"] == {"input": ref.usage.prompt_tokens, "output": 40}
    assert "".join(t for o in outputs for t in o["choices"][0]["tokens"]) == ref.choices[0].text


def test_standard_default_batch_schedule(queue, worker):
    job = {"prompt": "Once upon a time", "stream": True,
           "sampling_params": {"max_tokens": 45, "ignore_eos": True}}
    outputs, _ = run(queue, worker, job)
    assert [len(o["choices"][0]["tokens"]) for o in outputs] == [1, 3, 9, 27, 5]
    assert outputs[-1]["usage"]["output"] == 45


def test_standard_messages_non_stream_n2(queue, worker):
    job = {"messages": FRANCE, "sampling_params": {"n": 2, "max_tokens": 12, "ignore_eos": True, "seed": 7}}
    outputs, result = run(queue, worker, job)
    [out] = result["output"]
    assert len(out["choices"]) == 2 and all(len(c["tokens"]) == 1 for c in out["choices"])
    assert out["usage"]["output"] == 24 and out["usage"]["input"] > 10


def test_standard_chat_template_and_default_max_tokens(queue, worker):
    """`apply_chat_template` makes the prompt a user message; with no max_tokens the
    answer is not cut at vLLM's 16 (min_tokens forces it past that)."""
    job = {"prompt": "What is the capital of France?", "apply_chat_template": True,
           "sampling_params": {"temperature": 0, "min_tokens": 20}}
    _, result = run(queue, worker, job)
    [out] = result["output"]
    assert "Paris" in out["choices"][0]["tokens"][0]
    assert out["usage"]["output"] >= 20


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("job_input,param,code", [
    ({"sampling_params": {"max_tokens": 5}}, "prompt", None),
    ({"prompt": "hi", "sampling_params": {"temperature": -1}}, "sampling_params.temperature", None),
    ({"prompt": "hi", "sampling_params": {"max_tokenz": 5}}, "sampling_params.max_tokenz", None),
    ({"prompt": "hi", "min_batch_size": 0}, "min_batch_size", None),
    ({"prompt": "hi " * 3000}, "prompt", "context_length_exceeded"),
    ({"openai_route": "/v1/audio/speech", "openai_input": {"input": "x"}}, "openai_route", "unknown_route"),
    ({"openai_route": "/v1/responses", "openai_input": {"input": "x", "previous_response_id": "resp_none"}},
     "previous_response_id", "previous_response_not_found"),
    ({"openai_route": "/v1/chat/completions", "openai_input": {"model": "gpt-4", "messages": FRANCE}}, "model", "model_not_found"),
    ({"openai_route": "/v1/chat/completions", "openai_input": {"messages": FRANCE, "n": 0}}, "n", None),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "max_tokens": 5000}}, "max_tokens", "context_length_exceeded"),
    # hostile values: numbers beyond 64 bits, huge lists
    ({"prompt": "hi", "sampling_params": {"seed": 10**30}}, "sampling_params.seed", None),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": 10**30}]}, *FRANCE]},
     "messages[0].tool_calls[0].id", None),
    ({"openai_route": "/v1/chat/completions", "openai_input": {"messages": FRANCE, "stop": ["a"] * 100_000}}, "stop", None),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": [1] * 100_000}}, "prompt", "context_length_exceeded"),
])
def test_bad_input_fails_the_job_with_an_openai_error(queue, worker, job_input, param, code):
    outputs, result = run(queue, worker, job_input)
    err = job_error(result)
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] in ("invalid_request_error", "not_found_error") and err["message"]


def test_worker_keeps_serving_after_failures(queue, worker):
    bad = [queue.submit({"prompt": ""}), queue.submit("not an object")]
    good = queue.submit({"prompt": "Hello", "sampling_params": {"max_tokens": 3, "ignore_eos": True}})
    assert all("error" in queue.wait_done(j) for j in bad)
    [out] = queue.wait_done(good)["output"]
    assert out["usage"]["output"] == 3
    assert worker.alive()


# ------------------------------------------------------------ concurrency, cancel


def test_jobs_run_concurrently_up_to_max_concurrency(queue, worker, engine_endpoint):
    queue.max_in_flight = 0
    ids = [queue.submit({"prompt": f"Story number {i}:", "stream": True,
                         "sampling_params": {"max_tokens": 48, "ignore_eos": True}}) for i in range(6)]
    results = [queue.wait_done(j, 180) for j in ids]
    assert all(sum(len(o["choices"][0]["tokens"]) for o in r["output"]) > 0 for r in results)
    assert all(r["output"][-1]["usage"]["output"] == 48 for r in results)
    assert queue.max_in_flight == MAX_CONCURRENCY


def test_cancelled_job_aborts_its_engine_request(queue, worker, engine_endpoint):
    endpoint, _ = engine_endpoint
    job_id = queue.submit({"prompt": "Count:", "stream": True,
                           "sampling_params": {"max_tokens": 1500, "ignore_eos": True}})
    queue.wait_stream(job_id, 2)
    assert engine_running(endpoint) >= 1
    queue.stop(job_id)
    assert wait_idle(endpoint, 10), "engine still running the cancelled job's request"
    assert job_id not in queue.done or "error" not in queue.done[job_id]
    assert worker.alive()
    # and the worker still takes jobs
    _, result = run(queue, worker, {"prompt": "Hi", "sampling_params": {"max_tokens": 2, "ignore_eos": True}})
    assert result["output"][0]["usage"]["output"] == 2


def test_metrics_port(queue, worker):
    from prometheus_client.parser import text_string_to_metric_families

    run(queue, worker, {"prompt": "Hi", "sampling_params": {"max_tokens": 3, "ignore_eos": True}})
    run(queue, worker, {"prompt": ""})
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        gen = sum(v for (n, _), v in samples.items() if n == "vllm:generation_tokens_total")
        if gen >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert gen >= 3
    assert samples[("vllm_gateway:requests_total", (("route", "standard"), ("status", "200")))] >= 1
    assert samples[("vllm_gateway:requests_total", (("route", "standard"), ("status", "400")))] >= 1
    assert samples[("vllm_gateway:stream_batches_total", (("intake", "runpod"),))] >= 2


def test_pings_reach_the_queue(queue, worker):
    deadline = time.monotonic() + 10
    while not queue.pings and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queue.pings and queue.pings[0]["runpod_version"]


def test_sigterm_stops_the_worker_cleanly(list_worker):
    q, proc = list_worker
    assert proc.alive(), proc.tail()
    start = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout=30)
    assert code == 0 and time.monotonic() - start < 15, (code, proc.tail())
    assert "Traceback" not in proc.log_path.read_text(), proc.tail(100)


# ------------------------------------------------------- the entrypoint, end to end


def test_rp_serve_api_runsync_starts_its_own_engine(run_dir):
    """`vllm-gateway runpod --rp_serve_api`: the SDK's local test server, in front of
    an engine the worker started itself."""
    port = free_port()
    cwd = run_dir / "rp-serve-api"
    cwd.mkdir()
    proc = Proc("runpod-serve-api", ["vllm_gateway.gateway", "runpod", "--rp_serve_api", "--rp_api_port", str(port),
                                     "--max-model-len", "1024"], child_env(), run_dir, cwd=cwd)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.alive(), proc.tail()
            try:
                r = httpx.post(f"http://localhost:{port}/runsync", timeout=60, json={"input": {
                    "openai_route": "/v1/chat/completions",
                    "openai_input": {"model": MODEL, "messages": FRANCE, "max_tokens": 20, "temperature": 0}}})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, proc.tail()
                time.sleep(1)
        body = r.json()
        assert body["status"] == "COMPLETED", body
        assert "Paris" in body["output"][0]["choices"][0]["message"]["content"]
    finally:
        code = proc.stop(signal.SIGINT, timeout=60)
    assert code == 0, proc.tail()
    assert "Traceback" not in proc.log_path.read_text(), proc.tail(100)


def test_worker_exits_nonzero_when_the_engine_cannot_start(run_dir):
    cwd = run_dir / "rp-bad-engine"
    (cwd / "empty-model").mkdir(parents=True)
    proc = Proc("runpod-bad-engine", ["vllm_gateway.gateway", "runpod"], child_env(MODEL_NAME=str(cwd / "empty-model")), run_dir, cwd=cwd)
    try:
        code = proc.popen.wait(300)
    finally:
        proc.stop()
    assert code == 1, proc.tail()


def test_worker_refuses_a_bad_setting_at_once(run_dir):
    cwd = run_dir / "rp-bad-setting"
    cwd.mkdir()
    proc = Proc("runpod-bad-setting", ["vllm_gateway.gateway", "runpod"], child_env(MAX_MODEL_LEN="lots"), run_dir, cwd=cwd)
    try:
        code = proc.popen.wait(60)
    finally:
        proc.stop()
    assert code == 2 and "MAX_MODEL_LEN" in proc.log_path.read_text(), proc.tail()  # the bad setting is named


def test_engine_death_fails_the_job_and_the_worker_recovers(run_dir):
    """The worker's own engine killed mid-job: the job fails at once with the OpenAI
    error; the worker restarts the engine, and the next job waits for it and succeeds."""
    import os

    import psutil

    q = JobQueue()
    cwd = run_dir / "rp-own-engine"
    cwd.mkdir()
    proc = Proc("runpod-own-engine", ["vllm_gateway.gateway", "runpod", "--max-model-len", "1024"],
                child_env(MAX_CONCURRENCY="4", **q.env()), run_dir, cwd=cwd)
    try:
        job = q.submit({"prompt": "Count:", "stream": True, "sampling_params": {"max_tokens": 1000, "ignore_eos": True}})
        try:
            q.wait_stream(job, 2, timeout=600)
        except TimeoutError:
            raise AssertionError(proc.tail()) from None
        [engine] = [p for p in psutil.Process(proc.popen.pid).children() if "vllm_gateway.engine" in p.cmdline()]
        pid = engine.pid
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        err = job_error(q.wait_done(job, 30))
        assert time.monotonic() - killed < 10
        assert err["type"] == "engine_unavailable", err
        assert q.stream[job], "the batches sent before the failure stay sent"

        _, result = q.run({"prompt": "Hi", "sampling_params": {"max_tokens": 3, "ignore_eos": True}}, timeout=600)
        assert result["output"][0]["usage"]["output"] == 3, result
        [restarted] = [p for p in psutil.Process(proc.popen.pid).children() if "vllm_gateway.engine" in p.cmdline()]
        assert restarted.pid != pid
    finally:
        code = proc.stop(signal.SIGTERM, timeout=60)
        q.close()
    assert code == 0, proc.tail()


# ------------------------------------------------------------ accepted work


def test_a_failed_background_response_fetched_by_a_job_is_no_failed_job(queue, worker):
    """A background response whose submission fails (a number msgpack cannot carry,
    inside `tools`) ends `failed` with an error object; a job that fetches it
    succeeds, with the response as its output."""
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "maximum": 2**70}}}}
    _, result = run(queue, worker, {"route": "/v1/responses", "body": {
        "model": MODEL, "input": "Hi", "background": True, "store": True, "tools": [tool], "max_output_tokens": 4}})
    queued = result["output"][0]
    assert queued["status"] == "queued"
    deadline = time.monotonic() + 30
    while True:
        _, result = run(queue, worker, {"route": f"/v1/responses/{queued['id']}", "method": "GET"})
        assert "error" not in result, result  # the job itself succeeded
        fetched = result["output"][0]
        fetched = json.loads(fetched) if isinstance(fetched, str) else fetched
        if fetched["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert fetched["status"] == "failed" and fetched["error"]["message"], fetched


def test_sigterm_fails_the_jobs_still_running_after_the_drain(engine_endpoint, run_dir, gateway_url):
    endpoint, _ = engine_endpoint
    q = JobQueue()
    proc = start_worker("runpod-worker-drain", q, endpoint, run_dir, DRAIN_TIMEOUT_S="2")
    try:
        job_id = q.submit({"prompt": "Tell me a long story:", "stream": True,
                           "sampling_params": {"max_tokens": 1500, "ignore_eos": True}})
        q.wait_stream(job_id, 1, timeout=120)  # under way
        proc.popen.send_signal(signal.SIGTERM)
        result = q.wait_done(job_id, timeout=30)
        assert "error" in result and "DRAIN_TIMEOUT_S" in result["error"], result
        assert proc.popen.wait(60) == 0, proc.tail()
    finally:
        proc.stop()
        q.close()
    assert wait_idle(endpoint, 10)
