"""Routing decisions (gateway/engines/routing.py) on stand-in engines: a prefix
stays on its engine, tenants spread by load, a hot prefix spills over, records
are cut to the engine's KV capacity. tests/integration/test_multi_engine.py checks the same
decisions, and vLLM's prefix cache hits, with two real engines."""

from __future__ import annotations

import pytest

from vllm_gateway.gateway.config import GatewaySettings, RoutingSettings
from vllm_gateway.gateway.engines.routing import (
    BLOCK_BYTES,
    Balance,
    PrefixRecord,
    Router,
    block_hashes,
    prefix_key,
)
from vllm_gateway.protocol.messages import ChatPrompt, Generate, SamplingParams, TextPrompt, TokensPrompt


class Engine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.load = 0.0
        self.kv_cache_usage = 0.0
        self.record = PrefixRecord()

    def __repr__(self) -> str:
        return self.name


def gen(text: str, model: str = "") -> Generate:
    return Generate("r", TextPrompt(text), SamplingParams(), model=model)


TENANT = {t: f"tenant {t}: " + "You are the assistant of one tenant, with its long instructions. " * 20
          for t in "ABCD"}


def route(router: Router, engines: list[Engine], text: str, *, busy: bool = True) -> tuple[Engine, str]:
    e, why, _ = router.pick(engines, [gen(text)])
    if busy:
        e.load += 1  # the request runs on
    return e, why


def test_same_prefix_same_engine_and_tenants_spread():
    engines = [Engine("e0"), Engine("e1")]
    router = Router("prefix", Balance(abs=8, rel=1.5))
    first = {t: route(router, engines, TENANT[t] + "question 0") for t in "AB"}
    assert first["A"][0] is not first["B"][0]  # a new prefix goes to the least loaded
    assert {why for _, why in first.values()} == {"least_loaded"}
    for i in range(1, 6):
        for t in "AB":
            e, why = route(router, engines, TENANT[t] + f"question {i}")
            assert (e, why) == (first[t][0], "prefix")


@pytest.mark.parametrize("home_kv", [0.0, 0.3])
def test_hot_prefix_spills_over_then_both_engines_hold_it(home_kv):
    """The margin counts requests: the KV cache the home engine's streams fill
    (the CI failure of test_multi_engine's spill test) does not spill the third."""
    engines = [Engine("e0"), Engine("e1")]
    router = Router("prefix", Balance(abs=2, rel=1.5))
    placed = [route(router, engines, TENANT["A"] + "q0")]
    home = placed[0][0]
    home.kv_cache_usage = home_kv
    placed += [route(router, engines, TENANT["A"] + f"q{i}") for i in range(1, 4)]
    assert [e for e, _ in placed[:3]] == [home] * 3
    assert placed[3][1] == "spill" and placed[3][0] is not home
    # Now both engines hold the prefix: ties go to the less loaded.
    e, why = route(router, engines, TENANT["A"] + "q4")
    assert why == "prefix" and e is not home


def test_one_system_prompt_for_every_request_under_a_burst_uses_both_engines():
    """An application's one long system prompt, 64 requests at once (none done
    yet, so each placed request counts as load at once, as the gateway counts its own):
    the first engine takes it, the burst spills to the other once the first is
    busier by the margin, then both hold the prompt and share the rest."""
    engines = [Engine("e0"), Engine("e1")]
    router = Router("prefix")  # the default margins: 8 requests and 1.5 times
    system = {"role": "system", "content": "You are the support assistant of one shop. " * 60}
    placed = []
    for i in range(64):
        g = Generate(f"r{i}", ChatPrompt([system, {"role": "user", "content": f"Question {i}: where is my order?"}]),
                     SamplingParams())
        e, why, _ = router.pick(engines, [g])
        e.load += 1
        placed.append((e, why))
    counts = [sum(e is x for e, _ in placed) for x in engines]
    assert abs(counts[0] - counts[1]) <= router.balance.abs + 1, counts
    assert [why for _, why in placed].count("spill") == 1
    prefix = block_hashes(prefix_key(Generate("x", ChatPrompt([system]), SamplingParams())))[:-1]
    assert all(e.record.matched(prefix) == len(prefix) for e in engines)  # both caches hold it


def test_least_loaded_ignores_prefixes():
    engines = [Engine("e0"), Engine("e1")]
    router = Router("least_loaded")
    seen = [route(router, engines, TENANT["A"] + f"q{i}")[0] for i in range(4)]
    assert seen == [engines[0], engines[1], engines[0], engines[1]]
    assert len(engines[0].record) == 0  # nothing recorded


def test_short_and_unshared_prompts_go_by_load():
    engines = [Engine("e0"), Engine("e1")]
    router = Router("prefix")
    assert route(router, engines, "Hi")[1] == "least_loaded"
    assert route(router, engines, "Hi")[0] is engines[1]
    e, why = route(router, engines, "x" * (BLOCK_BYTES * 3))
    f, why2 = route(router, engines, "y" * (BLOCK_BYTES * 3))
    assert why == why2 == "least_loaded"


def test_record_keeps_the_shared_prefix_and_forgets_old_tails():
    record = PrefixRecord(capacity=10)
    shared = "s" * (BLOCK_BYTES * 4)
    chains = [block_hashes(prefix_key(gen(shared + str(i) * (BLOCK_BYTES * 3)))) for i in range(4)]
    for c in chains:
        record.add(c)
        assert len(record) <= 10
    assert record.matched(chains[-1]) == len(chains[-1])  # the latest whole
    assert record.matched(chains[0]) == 4  # the first: its prefix only
    record.resize(kv_cache_tokens=BLOCK_BYTES // 4 * 2)  # two blocks' worth
    assert len(record) == 2 and record.matched(chains[-1]) == 2


def test_the_record_is_sized_at_the_bytes_per_token_the_requests_show():
    """Random words run at ~6 bytes a token: a record sized at 4 would forget a
    third of what the engine's cache holds (the prefix benchmark's regression)."""
    router = Router("prefix")
    assert router.bytes_per_token == 4.0
    moved = [router.learn(key_bytes=17_000, prompt_tokens=2_850) for _ in range(20)]
    assert moved[0] and 5.7 < router.bytes_per_token < 6.0
    assert sum(moved) < 5  # records are resized when the figure moves, not per request
    record = PrefixRecord()
    record.resize(kv_cache_tokens=23_296, bytes_per_token=router.bytes_per_token)
    assert record.capacity == int(23_296 * router.bytes_per_token) // BLOCK_BYTES
    assert not router.learn(0, 10) and not router.learn(10, 0)  # nothing to learn from


def test_keys_follow_the_prompt_kind_and_model():
    text = "z" * (BLOCK_BYTES * 2)
    assert block_hashes(prefix_key(gen(text))) != block_hashes(prefix_key(gen(text, model="my-lora")))
    tokens = Generate("r", TokensPrompt(list(range(100))), SamplingParams())
    assert len(block_hashes(prefix_key(tokens))) == 100 * 8 // BLOCK_BYTES
    # A conversation that grows keeps the prefix of its earlier turns.
    turns = [{"role": "system", "content": TENANT["A"]}, {"role": "user", "content": "one"}]
    short = Generate("r", ChatPrompt(turns), SamplingParams())
    longer = Generate("r", ChatPrompt(turns + [{"role": "assistant", "content": "two"},
                                               {"role": "user", "content": "three"}]), SamplingParams())
    a, b = block_hashes(prefix_key(short)), block_hashes(prefix_key(longer))
    assert len(a) >= 10 and b[:len(a) - 1] == a[:-1]


def test_routing_settings_from_env():
    assert GatewaySettings.from_env({}).routing == RoutingSettings("prefix", 8.0, 1.5)
    s = GatewaySettings.from_env({"ROUTING": "least-loaded", "ROUTING_BALANCE_ABS": "4", "ROUTING_BALANCE_REL": "2"})
    assert s.routing == RoutingSettings("least_loaded", 4.0, 2.0)
    with pytest.raises(ValueError, match="ROUTING='random'"):
        GatewaySettings.from_env({"ROUTING": "random"})
    with pytest.raises(ValueError, match="ROUTING_BALANCE_REL"):
        GatewaySettings.from_env({"ROUTING_BALANCE_REL": "0.5"})
    with pytest.raises(ValueError):
        Router("random")  # type: ignore[arg-type]
