"""Unit: every message survives the wire, and the wire is msgpack (no pickle)."""

import msgspec
import pytest

from protocol.messages import (
    Abort, ChatPrompt, Delta, EngineStatus, Generate, Hello, Outputs, RequestFailed,
    SamplingParams, TextPrompt, TokenLogprob, TokensPrompt,
    decode_engine_message, decode_gateway_message, encode,
)

GATEWAY_MESSAGES = [
    Hello("gw-1"),
    Generate("r1", TextPrompt("hi", add_special_tokens=False), SamplingParams(n=3, stop=["\n"], seed=7, logit_bias={5: -1.0})),
    Generate("r2", TokensPrompt([1, 2, 3]), SamplingParams(max_tokens=4), return_prompt=True),
    Generate("r3", ChatPrompt([{"role": "user", "content": "x"}], add_generation_prompt=False, chat_template_kwargs={"a": 1}), SamplingParams()),
    Abort(["r1", "r2"]),
]
ENGINE_MESSAGES = [
    Outputs([
        Delta("r1", 0, "Hel", [1, 2], 5),
        Delta("r1", 1, "lo", [3], 5, "stop", "\n", [TokenLogprob(3, "lo", -0.5, [("lo", -0.5, 3), ("la", -1.5, 4)])],
              prompt_text="p", prompt_token_ids=[9], prompt_logprobs=[TokenLogprob(9, "p", None), None]),
    ]),
    RequestFailed("r1", 400, "too long", param="max_tokens"),
    EngineStatus("0", "abc", "ready", model="m", max_model_len=2048, running=2, waiting=1, kv_cache_usage=0.5),
]


@pytest.mark.parametrize("msg", GATEWAY_MESSAGES, ids=lambda m: type(m).__name__)
def test_gateway_messages_round_trip(msg):
    assert decode_gateway_message(encode(msg)) == msg


@pytest.mark.parametrize("msg", ENGINE_MESSAGES, ids=lambda m: type(m).__name__)
def test_engine_messages_round_trip(msg):
    assert decode_engine_message(encode(msg)) == msg


def test_wire_is_msgpack_arrays_not_pickle():
    raw = encode(Outputs([Delta("r1", 0, "a", [1], 2)]))
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    decoded = msgspec.msgpack.decode(raw)
    assert decoded[0] == "out" and decoded[1][0][:3] == ["r1", 0, "a"]


def test_garbage_is_rejected_cleanly():
    with pytest.raises(msgspec.DecodeError):
        decode_gateway_message(b"\xc1garbage")
    with pytest.raises(msgspec.ValidationError):
        decode_gateway_message(msgspec.msgpack.encode(["nope", 1]))
