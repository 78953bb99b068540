"""Units of the gateway, no vLLM: formatting, routing, restart detection, restart
backoff. (Failover between engine processes: integration/test_gateway_alone.py.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.engines.client import EngineClient, NoEngine
from vllm_gateway.gateway.engines.streams import StreamFailed
from vllm_gateway.gateway.openai.formatting import ChatFormatter, CompletionFormatter
from vllm_gateway.gateway.supervisor import launcher
from vllm_gateway.protocol.messages import PROTOCOL_VERSION, Delta, EngineStatus, Generate, SamplingParams, TextPrompt, TokenLogprob

# ------------------------------------------------------------------ formatting


def test_chat_chunks_usage_and_whole_answer():
    fmt = ChatFormatter("r", 2, "m", "assistant", continuous_usage=True)
    assert [c.delta.role for c in fmt.role_chunk().choices] == ["assistant", "assistant"]
    chunks = fmt.chunks([Delta("r", 0, "Hel", [1, 2], 5), Delta("r", 1, "Hi", [3], 5, "stop", "\n")])
    assert [(c.choices[0].index, c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks] == [
        (0, "Hel", None), (1, "Hi", "stop")]
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 5
    assert fmt.usage_chunk().usage.total_tokens == 8

    whole = ChatFormatter("r", 1, "m", "bot")
    whole.add([Delta("r", 0, "Hel", [1], 5,
                     logprobs=[TokenLogprob(1, "Hel", -0.5, [("Hel", -0.5, 1), ("Ha", -1.0, 9)])])])
    whole.add([Delta("r", 0, "lo", [2], 5, "length", logprobs=[TokenLogprob(2, "lo", -1e6)])])
    r = whole.response()
    assert r.choices[0].message.content == "Hello" and r.choices[0].message.role == "bot"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert [t.logprob for t in r.choices[0].logprobs.content] == [-0.5, -9999.0]  # clamped as OpenAI does
    assert r.choices[0].logprobs.content[0].bytes == list(b"Hel")


def test_tool_call_pieces_merge_and_format_as_openai_deltas():
    """A lagging reader's merged deltas (and a non-streamed answer) join the
    pieces of each tool call: id and name kept from the first, arguments in order."""
    from vllm_gateway.gateway.engines.streams import merge
    from vllm_gateway.protocol.messages import ToolCallDelta

    pieces = [
        Delta("r", 0, "", [1], 5, reasoning="Let me "),
        Delta("r", 0, "", [2], 5, reasoning="look.", tool_calls=[ToolCallDelta(0, "call_a", "get_weather", "")]),
        Delta("r", 0, "", [3], 5, tool_calls=[ToolCallDelta(0, arguments='{"city": ')]),
        Delta("r", 0, "", [4], 5, tool_calls=[ToolCallDelta(0, arguments='"Paris"}'),
                                              ToolCallDelta(1, "call_b", "get_time", '{"zone"')]),
        Delta("r", 0, "", [5], 5, finish_reason="tool_calls", tool_calls=[ToolCallDelta(1, arguments=': "UTC"}')],
              reasoning_tokens=2),
    ]
    [merged] = merge(pieces)
    assert merged.reasoning == "Let me look." and merged.token_ids == [1, 2, 3, 4, 5]
    assert [(c.index, c.id, c.name, c.arguments) for c in merged.tool_calls] == [
        (0, "call_a", "get_weather", '{"city": "Paris"}'), (1, "call_b", "get_time", '{"zone": "UTC"}')]
    assert merged.finish_reason == "tool_calls" and merged.reasoning_tokens == 2

    fmt = ChatFormatter("r", 1, "m", "assistant")
    chunks = [json.loads(json_encode(c)) for c in fmt.chunks(pieces)]
    first_call = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert first_call == {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert chunks[2]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = ChatFormatter("r", 1, "m", "assistant")
    whole.add(pieces)
    msg = json.loads(json_encode(whole.response()))["choices"][0]["message"]
    assert msg["content"] is None and msg["reasoning"] == "Let me look."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        ("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"zone": "UTC"})]
    assert json.loads(json_encode(whole.response()))["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


def test_completion_echo_offsets_and_prompt_indexes():
    fmt = CompletionFormatter(["a", "b"], 1, "m", echo=True)
    lp = [TokenLogprob(7, "ok", -0.1)]
    fmt.add([Delta("a", 0, "ok", [7], 2, "length", logprobs=lp, prompt_text="Hi ",
                   prompt_logprobs=[None, TokenLogprob(4, " ", -2.0)])])
    fmt.add([Delta("b", 0, "yes", [8], 3, "stop", prompt_text="Yo ")])
    r = fmt.response()
    assert [c.text for c in r.choices] == ["Hi ok", "Yo yes"]  # one choice per prompt, prompt echoed
    assert r.choices[0].logprobs.tokens == ["", " ", "ok"]
    assert r.choices[0].logprobs.token_logprobs == [None, -2.0, -0.1]
    assert r.choices[0].logprobs.text_offset == [0, 0, 1]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 2


# ------------------------------------------------------- routing and restarts


def status(instance: str = "i1", running: int = 0, state: str = "ready", in_engine: int = 0) -> EngineStatus:
    return EngineStatus("0", instance, state, "m", 64, running=running, protocol_version=PROTOCOL_VERSION,
                        in_engine=in_engine)


def gen(rid: str) -> Generate:
    return Generate(rid, TextPrompt("hi"), SamplingParams(max_tokens=4))


def with_client(tmp_path, n: int, body) -> None:
    async def main():
        client = EngineClient([f"ipc://{tmp_path}/e{i}" for i in range(n)])
        try:
            await body(client)
        finally:
            await client.close()

    asyncio.run(main())


def test_least_loaded_routing_spreads_a_burst(tmp_path):
    async def body(client: EngineClient):
        for e, running in zip(client.engines, (3, 0, 1)):  # other gateways' requests
            client._on_status(e, status(running=running))
        # the reports are stale within a burst: this gateway counts its own
        picked = [client.submit([gen(f"r{i}")]).engine for i in range(6)]
        idx = [client.engines.index(e) for e in picked]
        assert idx[:2] == [1, 1] or idx[:3].count(1) >= 2
        loads = [e.load for e in client.engines]
        assert max(loads) - min(loads) <= 1, loads
        # a report that counts this gateway's requests does not count them twice
        e = client.engines[1]
        before, mine = e.load, e.generating
        client._on_status(e, status(running=e.status.running + mine, in_engine=mine))
        assert e.load == before
        # nor does one that crossed requests on the wire (made before it took them)
        for i in range(2):
            client.submit([gen(f"late-{i}")])
        for engine in client.engines:
            before = engine.load
            client._on_status(engine, status(running=engine.status.running, in_engine=engine.status.in_engine))
            assert engine.load == before, (before, engine.load)
        # a new engine life has none of them (they failed)
        client._on_status(e, status(instance="i2"))
        assert e.generating == 0 and e.load == 0

    with_client(tmp_path, 3, body)


def test_a_request_that_ended_stops_counting_before_the_next_report(tmp_path):
    """A report counts a request that just ended until the next one: the request
    that followed it went to the other engine (13/11 splits of 24 long prompts in
    the prefix-routing benchmark; 4 quick sequential requests spilled over a
    margin of 2 once in CI)."""
    async def body(client: EngineClient):
        a, b = client.engines
        client._on_status(a, status())
        client._on_status(b, status(running=1))  # another gateway's
        streams = [client.submit([gen(f"q{i}")]) for i in range(3)]
        assert [s.engine for s in streams] == [a, a, b]
        client._on_status(a, status(running=2, in_engine=2))
        client._on_status(b, status(running=2, in_engine=1))
        assert (a.load, b.load) == (2, 2)
        first = streams[0]
        first.push(Delta(first.request_ids[0], 0, "x", [1], 2, "stop"))
        assert a.load == 1  # ended (its last output not read yet), though the report still has it
        client.release(first, abort=False)
        assert a.load == 1
        assert client.submit([gen("next")]).engine is a
        # sequential quick requests, each ended before any report: no load piles up
        for i in range(4):
            s = client.submit([gen(f"seq{i}")])
            s.push(Delta(s.request_ids[0], 0, "x", [1], 2, "stop"))
            client.release(s, abort=False)
        assert a.load == 2 and b.load == 2

    with_client(tmp_path, 2, body)


def test_an_engine_that_is_not_ready_gets_nothing(tmp_path):
    async def body(client: EngineClient):
        a, b = client.engines
        client._on_status(a, status(running=0, state="loading"))
        client._on_status(b, status(running=50))
        assert all(client.submit([gen(f"r{i}")]).engine is b for i in range(3))
        b.last_seen -= 60  # silent for a minute: not ready either
        assert not client.ready
        with pytest.raises(NoEngine):
            client.submit([gen("r9")])

    with_client(tmp_path, 2, body)


def test_a_restarted_engine_fails_what_it_had_in_flight(tmp_path):
    async def body(client: EngineClient):
        [e] = client.engines
        client._on_status(e, status("first-life"))
        stream = client.submit([gen("r1")])
        client._on_status(e, status("first-life"))  # the same life: nothing happens
        assert stream.error is None
        client._on_status(e, status("second-life"))  # a new instance knows nothing of r1
        with pytest.raises(StreamFailed) as failed:
            await stream.next()
        assert failed.value.failure.kind.name == "ENGINE_UNAVAILABLE"
        assert e.ready and not e.streams

    with_client(tmp_path, 1, body)


# ------------------------------------------------------------- restart backoff


class FakeEngines(launcher.EngineProcesses):
    """EngineProcesses whose 'engines' are short Python processes that exit at once."""

    def __init__(self, exit_code: int = 3) -> None:
        self.exit_code = exit_code
        super().__init__([], env={"NUM_ENGINES": "1"})

    def _spawn(self, slot):
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({self.exit_code})"])


def test_restart_backoff_doubles_up_to_the_cap_and_resets_after_a_long_run(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    engines = FakeEngines()
    try:
        engines.mark_ready()
        delays = []
        for _ in range(8):
            engines.procs[0].wait()
            engines.poll()  # notices the exit, schedules the restart
            delays.append(engines.restart_at[0] - clock[0])
            clock[0] = engines.restart_at[0]
            engines.poll()  # restarts it
            assert engines.restart_at[0] is None
        assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
        clock[0] += launcher.RESTART_BACKOFF_RESET_S + 1  # it ran for a long while before dying
        engines.procs[0].wait()
        engines.poll()
        assert engines.restart_at[0] - clock[0] == launcher.RESTART_BACKOFF_MIN_S
    finally:
        engines.stop()


@pytest.mark.parametrize("engine_code,command_code", [(3, 1), (2, 2)])
def test_an_engine_that_dies_before_it_was_ever_ready_is_a_start_failure(engine_code, command_code):
    """An engine that refused its settings (exit 2) makes `serve` / `runpod` exit 2 too."""
    engines = FakeEngines(engine_code)
    try:
        engines.procs[0].wait()
        with pytest.raises(launcher.EngineStartFailed) as failed:
            engines.poll()
        assert failed.value.exit_code == command_code
    finally:
        engines.stop()


def test_router_gauges_are_the_pods_first_then_each_engines():
    """The first sample of each gauge a router reads sums the engines serving the
    model; per-engine numbers live under vllm_gateway:engine_*; LoRA and cache
    config as vLLM names them."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_gateway.gateway.metrics import LoadCollector

    class _Engine:
        def __init__(self, status: EngineStatus) -> None:
            self.status, self.ready, self.endpoint, self.choices, self.metrics = status, True, "ipc://x", {}, None

        def requests_now(self) -> tuple[int, int]:
            return self.status.running, self.status.waiting

    def status(engine_id: str, running: int, waiting: int, kv: float, lora: list[str]) -> EngineStatus:
        return EngineStatus(engine_id, "i", "ready", model="m", running=running, waiting=waiting, kv_cache_usage=kv,
                            block_size=16, num_gpu_blocks=100 if engine_id == "0" else 300, max_loras=2,
                            running_lora_adapters=lora)

    class _Client:
        engines = [_Engine(status("0", 3, 1, 0.5, ["a"])), _Engine(status("1", 2, 0, 0.1, ["b", "a"]))]

    registry = CollectorRegistry()
    registry.register(LoadCollector(lambda: _Client()))
    first: dict = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            first.setdefault(sample.name, sample)
    assert first["vllm:num_requests_running"].value == 5 and first["vllm:num_requests_waiting"].value == 1
    assert first["vllm:num_requests_running"].labels == {"model_name": "m"}
    assert first["vllm:kv_cache_usage_perc"].value == pytest.approx((0.5 * 100 + 0.1 * 300) / 400)
    assert first["vllm:cache_config_info"].labels == {"model_name": "m", "block_size": "16", "num_gpu_blocks": "400"}
    assert first["vllm:lora_requests_info"].labels["running_lora_adapters"] == "a,b"
    assert first["vllm:lora_requests_info"].labels["max_lora"] == "2"
    assert first["vllm_gateway:engine_requests_running"].labels == {"engine": "0", "model_name": "m"}


def test_running_and_waiting_count_this_gateways_requests_since_the_report(tmp_path):
    """An engine's report lags: requests this gateway sent since wait, those
    that ended since are off running; other gateways' stay as reported."""
    import zmq.asyncio

    from vllm_gateway.gateway.engines.client import EngineConnection
    from vllm_gateway.gateway.engines.streams import RequestStream

    ctx = zmq.asyncio.Context()
    engine = EngineConnection(f"ipc://{tmp_path}/nobody", ctx, 5.0)
    try:
        # 3 running, 1 waiting; 2 of the running are this gateway's
        engine.status = EngineStatus("0", "i", "ready", "m", 64, running=3, waiting=1, in_engine=2,
                                     protocol_version=PROTOCOL_VERSION)
        mine = [RequestStream([f"r{i}"], 1, engine) for i in range(2)]
        for i, s in enumerate(mine):
            engine.streams[f"r{i}"] = s
        assert engine.requests_now() == (3, 1) and engine.load == 4
        for i in range(2, 5):  # a burst of 3 since the report
            engine.streams[f"r{i}"] = RequestStream([f"r{i}"], 1, engine)
        assert engine.requests_now() == (3, 4) and engine.load == 7
        for i in range(5):  # all five of ours ended: the report's other two remain
            engine.streams.pop(f"r{i}")
        assert engine.requests_now() == (1, 1) and engine.load == 2
    finally:
        engine.sock.close(0)
        engine.monitor.close(0)
        ctx.term()
