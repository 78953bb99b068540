"""Unit: OpenAI request validation and conversion to engine messages (no engine)."""

import msgspec
import pytest

from vllm_gateway.gateway.core.errors import APIError, from_validation
from vllm_gateway.gateway.core.generate import chat_generate, check_model
from vllm_gateway.gateway.core.requests import ChatCompletionRequest
from vllm_gateway.gateway.core.schema import json_decoder
from vllm_gateway.gateway.openai.validation import completion_generates
from vllm_gateway.protocol.messages import ChatPrompt, TextPrompt, TokensPrompt
from vllm_gateway.gateway.openai.schemas import CompletionRequest

decode_chat_request = json_decoder(ChatCompletionRequest)
decode_completion_request = json_decoder(CompletionRequest)


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return chat_generate(decode_chat_request(msgspec.json.encode(body)), "r")


def completion(**kw):
    body = {"model": "m", "prompt": "hi", **kw}
    return completion_generates(decode_completion_request(msgspec.json.encode(body)), "r")


def bad_field(fn, **kw) -> APIError:
    try:
        fn(**kw)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return from_validation(e)
    except APIError as e:
        return e
    raise AssertionError("accepted")


def test_chat_defaults_and_fields():
    g = chat(temperature=0.2, top_p=0.9, top_k=-1, stop="END", seed=3, max_completion_tokens=9,
             logprobs=True, top_logprobs=2, presence_penalty=0.5, logit_bias={"10": 5})
    assert isinstance(g.prompt, ChatPrompt) and g.prompt.messages[0]["content"] == "hi"
    p = g.params
    assert (p.temperature, p.top_p, p.top_k, p.stop, p.seed, p.max_tokens, p.logprobs) == (0.2, 0.9, 0, ["END"], 3, 9, 2)
    assert p.presence_penalty == 0.5 and p.logit_bias == {10: 5.0}
    assert chat().params.max_tokens is None  # engine fills in the room left in the context


def test_content_parts_reach_vllms_renderer_as_sent():
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    g = chat_generate(decode_chat_request(msgspec.json.encode({"messages": [{"role": "user", "content": parts}]})), "r")
    assert g.prompt.messages[0]["content"] == parts


def _constraint(**kw):
    return chat_generate(decode_chat_request(msgspec.json.encode({"messages": [{"role": "user", "content": "x"}], **kw})),
                         "r").params.structured_outputs


def test_every_name_of_a_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    so = _constraint(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}})
    assert msgspec.json.decode(so.json) == schema and so.origin == "response_format"
    assert _constraint(response_format={"type": "json_object"}).json_object is True
    assert _constraint(response_format={"type": "text"}) is None
    so = _constraint(structured_outputs={"regex": "[a-z]+", "disable_any_whitespace": True})
    assert (so.regex, so.disable_any_whitespace, so.origin) == ("[a-z]+", True, "structured_outputs")
    assert msgspec.json.decode(_constraint(structured_outputs={"json": schema}).json) == schema
    # response_format overrides structured_outputs' constraint and keeps its options (as vLLM)
    so = _constraint(structured_outputs={"regex": "a", "disable_any_whitespace": True}, response_format={"type": "json_object"})
    assert so.regex is None and so.json_object and so.disable_any_whitespace
    for name, value, field in [("guided_json", schema, "json"), ("guided_regex", "x+", "regex"),
                               ("guided_choice", ["a", "b"], "choice"), ("guided_grammar", "root ::= \"a\"", "grammar")]:
        so = _constraint(**{name: value})
        assert so.origin == name and getattr(so, field) == (msgspec.json.encode(value).decode() if field == "json" else value)


@pytest.mark.parametrize("kw,param", [
    ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"min_p": 2}, "min_p"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content"),
    ({"messages": "hello"}, "messages"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"tools": []}, "tools"),
    ({"tool_choice": 3}, "tool_choice"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
])
def test_chat_rejections_name_the_field(kw, param):
    err = bad_field(chat, **kw)
    assert err.status == 400 and err.param == param, err.message


def test_completion_prompt_shapes():
    assert isinstance(completion()[0].prompt, TextPrompt)
    assert completion()[0].params.max_tokens == 16
    gens = completion(prompt=["a", "b"])
    assert [g.prompt.text for g in gens] == ["a", "b"] and gens[0].request_id != gens[1].request_id
    assert completion(prompt=[1, 2, 3])[0].prompt == TokensPrompt([1, 2, 3])
    assert [g.prompt.token_ids for g in completion(prompt=[[1], [2, 3]])] == [[1], [2, 3]]
    g = completion(echo=True, logprobs=2)[0]
    assert g.return_prompt and g.params.prompt_logprobs == 2 and g.params.logprobs == 2


@pytest.mark.parametrize("prompt", ["", [], [1, "a"], [[1], []], {"a": 1}, [True]])
def test_completion_bad_prompts(prompt):
    err = bad_field(completion, prompt=prompt)
    assert err.status == 400 and err.param == "prompt"


def test_completion_suffix_rejected():
    assert bad_field(completion, suffix="x").param == "suffix"


def test_unknown_model_is_404():
    check_model(None, "m")
    check_model("m", "m")
    with pytest.raises(APIError) as e:
        check_model("gpt-4", "m")
    assert e.value.status == 404 and e.value.param == "model"


def test_malformed_json():
    err = from_validation(_decode_error(b"{nope"))
    assert err.status == 400 and "malformed JSON" in err.message


def _decode_error(raw):
    try:
        decode_chat_request(raw)
    except msgspec.DecodeError as e:
        return e
