"""Unit: RunPod job inputs, batch schedules, worker settings, hub files, baking."""

import json

import msgspec
import pytest

from support import ROOT
from vllm_gateway.engine.args import SETTINGS
from vllm_gateway.gateway.config import RunPodSettings
from vllm_gateway.gateway.core.errors import APIError, from_validation
from vllm_gateway.gateway.runpod.standard import job_generate
from vllm_gateway.gateway.runpod.worker import BatchSizer
from vllm_gateway.protocol.messages import ChatPrompt, TextPrompt
from vllm_gateway.gateway.runpod.schemas import job_input_from_dict


def schedule(sizer: BatchSizer, k: int) -> list[int]:
    out = []
    for _ in range(k):
        out.append(sizer.size)
        sizer.grow()
    return out


@pytest.mark.parametrize("args,expected", [
    ((50, 1, 3), [1, 3, 9, 27, 50, 50]),
    ((10, 2, 2), [2, 4, 8, 10, 10, 10]),
    ((8, 1, 1.5), [1, 2, 3, 4, 6, 8]),  # 1, 1.5, 2.25, 3.375, 5.06, 7.6 rounded up
    ((50, 1, 1), [50, 50, 50, 50, 50, 50]),  # no growth: every batch the max
    ((5, 10, 3), [5, 5, 5, 5, 5, 5]),  # min over max: the max
])
def test_batch_schedules(args, expected):
    assert schedule(BatchSizer(*args), 6) == expected


def test_runpod_settings_from_env():
    s = RunPodSettings.from_env({})
    assert (s.max_concurrency, s.raw_openai_output, s.max_batch_size, s.min_batch_size, s.batch_size_growth_factor) == (300, True, 50, 1, 3.0)
    s = RunPodSettings.from_env({"MAX_CONCURRENCY": "8", "RAW_OPENAI_OUTPUT": "0", "DEFAULT_BATCH_SIZE": "20",
                                 "DEFAULT_MIN_BATCH_SIZE": "4", "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "2.5",
                                 "OPENAI_RESPONSE_ROLE": "bot"})
    assert (s.max_concurrency, s.raw_openai_output, s.max_batch_size, s.min_batch_size, s.batch_size_growth_factor, s.response_role) == (8, False, 20, 4, 2.5, "bot")
    with pytest.raises(ValueError, match="MAX_CONCURRENCY"):
        RunPodSettings.from_env({"MAX_CONCURRENCY": "many"})
    with pytest.raises(ValueError):
        RunPodSettings.from_env({"DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "0.5"})


def gen(**job):
    return job_generate(job_input_from_dict(job), "r")


def test_job_prompt_messages_and_template():
    g = gen(prompt="hello", sampling_params={"temperature": 0.5, "top_k": -1, "stop": "x"})
    assert g.prompt == TextPrompt("hello") and g.params.temperature == 0.5 and g.params.top_k == 0
    assert g.params.stop == ["x"]
    assert g.params.max_tokens is None  # what the context has left, not vLLM's 16
    g = gen(prompt="hello", apply_chat_template=True)
    assert g.prompt == ChatPrompt([{"role": "user", "content": "hello"}])
    g = gen(prompt="ignored", messages=[{"role": "user", "content": "hi"}])
    assert isinstance(g.prompt, ChatPrompt) and g.prompt.messages[0]["content"] == "hi"


def test_job_seed_table_parameters_pass_through():
    sp = {"n": 2, "best_of": 2, "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
          "temperature": 0.3, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "use_beam_search": False,
          "length_penalty": 1.0, "early_stopping": False, "stop": ["a"], "stop_token_ids": [2],
          "ignore_eos": True, "max_tokens": 9, "skip_special_tokens": False, "spaces_between_special_tokens": False,
          "seed": 4, "min_tokens": 1, "include_stop_str_in_output": True, "logit_bias": {"7": 1.0}}
    p = gen(prompt="x", sampling_params=sp).params
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.temperature, p.top_p, p.top_k,
            p.min_p, p.stop, p.stop_token_ids, p.ignore_eos, p.max_tokens, p.skip_special_tokens,
            p.spaces_between_special_tokens, p.seed, p.min_tokens, p.include_stop_str_in_output, p.logit_bias) == (
        2, 0.1, 0.2, 1.1, 0.3, 0.9, 5, 0.05, ["a"], [2], True, 9, False, False, 4, 1, True, {7: 1.0})


@pytest.mark.parametrize("job,param", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"messages": []}, "messages"),
    ({"prompt": "x", "sampling_params": {"use_beam_search": True}}, "use_beam_search"),
    ({"prompt": "x", "sampling_params": {"n": 2, "best_of": 3}}, "best_of"),
    ({"prompt": "x", "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
    ({"prompt": "x", "sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "batch_size_growth_factor": 0.5}, "batch_size_growth_factor"),
])
def test_job_rejections_name_the_field(job, param):
    try:
        gen(**job)
    except msgspec.ValidationError as e:
        err = from_validation(e, "job input")
    except APIError as e:
        err = e
    else:
        raise AssertionError("accepted")
    assert err.status == 400 and err.param == param, err.message


def test_hub_json_offers_every_setting():
    """Every engine setting and worker-vllm's worker settings are offered (what the
    Hub offers that the code reads, and its options, are checked against vLLM in
    tests/integration/test_engine_args.py)."""
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    keys = {e["key"] for e in hub["config"]["env"]}
    gone = {"SWAP_SPACE", "MAX_CONTEXT_LEN_TO_CAPTURE"}  # from vLLM V1: read, logged, ignored
    supervised = {"ENGINE_DRAIN_TIMEOUT_S"}  # engines a supervisor stops; a RunPod worker's stop with it
    assert {s.env for s in SETTINGS} - gone - supervised <= keys and not keys & gone
    assert {"MAX_CONCURRENCY", "RAW_OPENAI_OUTPUT", "DEFAULT_BATCH_SIZE", "DEFAULT_MIN_BATCH_SIZE",
            "DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "OPENAI_RESPONSE_ROLE", "NUM_ENGINES", "ROUTING"} <= keys
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    assert tests["tests"] and all("input" in t for t in tests["tests"])
