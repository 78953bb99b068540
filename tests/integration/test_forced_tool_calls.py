"""A forced tool call (`required`, or a named function) has arguments valid under
the tool's parameters whatever tool parser is configured: chat, Responses and
Anthropic Messages, streamed and not, each parser in an engine of its own.

The parsers cover the three ways vLLM reads a forced call: with a structural tag
of the model's own format (hermes: `<tool_call>{json}</tool_call>`; qwen3_xml:
`<function=...><parameter=...>`), where vLLM 0.32 pins only the call's envelope
and the default model then answered `"Paris"` for `{"city": ...}`; and with no
format vLLM can constrain (dots), where vLLM constrains nothing."""

import json

import anthropic
import jsonschema
import openai
import pytest

from support import MODEL, child_env, serving, stream_chat

PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": PARAMS}}
OTHER = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                          "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                         "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def valid(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, PARAMS if name == "get_weather" else OTHER["function"]["parameters"])
    return args


@pytest.fixture(scope="module", params=["hermes", "qwen3_xml", "dots"])
def parser_url(request, run_dir):
    with serving(f"serve-{request.param}", child_env(ENABLE_AUTO_TOOL_CHOICE="1", TOOL_CALL_PARSER=request.param),
                 run_dir) as (url, _):
        yield url


@pytest.fixture(scope="module")
def chat(parser_url):
    return openai.OpenAI(base_url=parser_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("choice", [NAMED, "required"], ids=["named", "required"])
def test_chat(chat, choice):
    kw = dict(messages=ASK, temperature=0, max_tokens=120, tools=[TOOL, OTHER], tool_choice=choice)
    r = chat.chat.completions.create(model=MODEL, **kw)
    calls = r.choices[0].message.tool_calls
    assert calls, r.choices[0].message
    for c in calls:
        valid(c.function.name, c.function.arguments)
    if choice == NAMED:
        assert [c.function.name for c in calls] == ["get_weather"]
    _, _, streamed, finish, _ = stream_chat(chat, **kw)
    assert [(c["name"], valid(c["name"], c["arguments"])) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert finish == r.choices[0].finish_reason


def test_responses(chat):
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMS}
    kw = dict(model=MODEL, input="What is the weather in Paris?", tools=[tool],
              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=120, temperature=0)
    r = chat.responses.create(**kw)
    [call] = [o for o in r.output if o.type == "function_call"]
    args = valid(call.name, call.arguments)
    with chat.responses.stream(**kw) as stream:
        events = list(stream)
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == args


def test_anthropic(parser_url):
    claude = anthropic.Anthropic(base_url=parser_url, api_key="unused", max_retries=0, timeout=120)
    kw = dict(model=MODEL, max_tokens=120, messages=ASK, extra_body={"temperature": 0},
              tools=[{"name": "get_weather", "description": "The weather in a city", "input_schema": PARAMS}],
              tool_choice={"type": "tool", "name": "get_weather"})
    m = claude.messages.create(**kw)
    [use] = [b for b in m.content if b.type == "tool_use"]
    jsonschema.validate(use.input, PARAMS)  # the object itself, not {"value": "..."}
    assert m.stop_reason == "tool_use"
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [use.input]
