"""vLLM's tool and reasoning parsers, chosen as `vllm serve` users choose them
(ENABLE_AUTO_TOOL_CHOICE=1, TOOL_CALL_PARSER=hermes, REASONING_PARSER=qwen3),
running in a real engine of their own behind a real gateway.

The tiny model never calls a tool of its own accord, so a constraint makes it
write exactly the hermes tool-call markup; the parser must find the call in it.
The qwen3 reasoning parser reads a Qwen3 thinking model's answer as reasoning
until `</think>`; the tiny model never writes one, so its whole greedy answer is
reasoning: deterministic, and enough to see where each piece goes."""

import json

import httpx
import openai
import pytest

from support import MODEL, child_env, serving
from support import ASK, WEATHER, stream_chat

# ChatML that prints each message's content as it gets it: under
# CHAT_TEMPLATE_CONTENT_FORMAT=openai, vLLM gives the template lists of parts.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def parsing_url(run_dir):
    env = child_env(ENABLE_AUTO_TOOL_CHOICE="1", TOOL_CALL_PARSER="hermes", REASONING_PARSER="qwen3",
                    CHAT_TEMPLATE=TEMPLATE, CHAT_TEMPLATE_CONTENT_FORMAT="openai")
    with serving("serve-parsers", env, run_dir) as (url, _):
        yield url


@pytest.fixture(scope="module")
def parsing(parsing_url):
    return openai.OpenAI(base_url=parsing_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_auto_tool_call_found_by_the_models_parser(parsing):
    # include_reasoning=False: the constraint holds from the first token (with
    # reasoning shown, vLLM applies it only once the reasoning has ended).
    kw = dict(messages=ASK, temperature=0, max_tokens=80, tools=[WEATHER],
              extra_body={"include_reasoning": False, "structured_outputs": {"regex": HERMES_CALL}})
    r = parsing.chat.completions.create(model=MODEL, **kw)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    content, reasoning, calls, finish, usage = stream_chat(parsing, **kw)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"] and finish == "tool_calls" and not content and not reasoning
    assert usage.completion_tokens == r.usage.completion_tokens


def test_auto_without_a_call_is_content(parsing):
    # qwen3 reads everything before `</think>` as reasoning: the answer comes after it.
    r = parsing.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=20, tools=[WEATHER],
                                        extra_body={"include_reasoning": False,
                                                    "structured_outputs": {"regex": "</think>No tool needed\\."}})
    assert r.choices[0].message.content == "No tool needed." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_reasoning_goes_to_its_field_streamed_and_not(parsing):
    r = parsing.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=12)
    msg = r.choices[0].message
    assert msg.reasoning and not msg.content
    assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens == 12
    content, reasoning, _, finish, usage = stream_chat(parsing, messages=ASK, temperature=0, max_tokens=12)
    assert reasoning == msg.reasoning and not content and finish == "length"
    assert usage.completion_tokens_details.reasoning_tokens == 12


def test_hidden_reasoning_leaves_the_answer(parsing):
    """include_reasoning=false: the thought is dropped, the answer after it kept."""
    kw = dict(messages=ASK, temperature=0, max_tokens=30,
              extra_body={"include_reasoning": False, "structured_outputs": {"regex": "<think>Rain\\.</think>It rains\\."}})
    r = parsing.chat.completions.create(model=MODEL, **kw)
    assert r.choices[0].message.content == "It rains." and r.choices[0].message.reasoning is None
    content, reasoning, _, _, _ = stream_chat(parsing, **kw)
    assert content == "It rains." and reasoning == ""


def test_chat_template_kwargs_pass_through(parsing):
    """`enable_thinking` reaches the template (SmolLM2's ignores it, so the prompt
    is the same), and an unknown kwarg is not an error, as in vLLM."""
    a = parsing.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    b = parsing.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_template_and_content_format_settings_reach_vllms_renderer(parsing_url, http):
    """CHAT_TEMPLATE replaces the model's template, and CHAT_TEMPLATE_CONTENT_FORMAT=openai
    makes vLLM hand it content as a list of parts, which it prints as it is (the
    shared engine, on `auto` with SmolLM2's template, gets the string)."""
    openai_format = httpx.post(parsing_url + "/tokenize", json={"messages": ASK}).json()["tokens"]
    auto = http.post("/tokenize", json={"messages": ASK}).json()["tokens"]
    text = httpx.post(parsing_url + "/detokenize", json={"tokens": openai_format}).json()["prompt"]
    assert "'type': 'text'" in text and openai_format != auto
