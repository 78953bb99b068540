"""Structured outputs, tool calls and the small vLLM routes, with the official
`openai` client against the shared gateway and real vLLM engine (no tool or
reasoning parser configured: `required` and named tool choices need none).

Outputs are forced, not hoped for: a constraint or a named tool choice makes the
tiny model emit exactly what the assertion needs."""

import json
import re

import httpx
import openai
import pytest

from support import ASK, MODEL, WEATHER, stream_chat

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


# ---------------------------------------------------------------------------- structured outputs


def test_json_schema_strict_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=60, response_format=fmt)
    person = json.loads(whole.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert whole.choices[0].finish_reason == "stop"
    content, _, _, finish, usage = stream_chat(client, messages=ASK, temperature=0, max_tokens=60, response_format=fmt)
    assert content == whole.choices[0].message.content and finish == "stop"
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens


def test_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of a JSON object
        assert r.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("extra,check", [
    ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"structured_outputs": {"choice": ["sunny", "rainy"]}}, lambda t: t in ("sunny", "rainy")),
    ({"structured_outputs": {"grammar": 'root ::= "It is " ("hot" | "cold") "."'}},
     lambda t: t in ("It is hot.", "It is cold.")),
    ({"structured_outputs": {"json": PERSON}}, lambda t: set(json.loads(t)) == {"name", "age"}),
    # the names worker-vllm users still send
    ({"guided_regex": r"[A-Z]{4}"}, lambda t: re.fullmatch(r"[A-Z]{4}", t)),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"guided_json": json.dumps(PERSON)}, lambda t: set(json.loads(t)) == {"name", "age"}),
    ({"guided_grammar": 'root ::= "ok"'}, lambda t: t == "ok"),
])
def test_every_constraint_on_chat(client, extra, check):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=60, extra_body=extra)
    text = r.choices[0].message.content
    assert check(text), text
    content, _, _, _, _ = stream_chat(client, messages=ASK, temperature=0, max_tokens=60, extra_body=extra)
    assert content == text


def test_constraint_on_completions(client):
    r = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=20, temperature=0,
                                  extra_body={"guided_choice": [" blue", " green"]})
    assert r.choices[0].text in (" blue", " green")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
])
def test_bad_constraint_is_400_before_any_stream(client, extra, param, stream):
    with pytest.raises(openai.BadRequestError) as e:
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, stream=stream, extra_body=extra)
        list(r) if stream else None
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


# ---------------------------------------------------------------------------- tool calls


def test_named_tool_call_streamed_and_not(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=60,
                                       tools=[WEATHER, TIME], tool_choice=choice)
    msg = r.choices[0].message
    [call] = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert set(json.loads(call.function.arguments)) == {"city"}
    assert r.choices[0].finish_reason == "stop"  # OpenAI's (and vLLM's) for a named function
    assert not msg.content
    content, _, calls, finish, usage = stream_chat(client, messages=ASK, temperature=0, max_tokens=60,
                                                   tools=[WEATHER, TIME], tool_choice=choice)
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    assert calls[0]["id"] and not content and finish == "stop"
    assert usage.completion_tokens == r.usage.completion_tokens


def test_required_tool_calls_streamed_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=120,
                                       tools=[WEATHER, TIME], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for c in calls:
        args = json.loads(c.function.arguments)
        assert (c.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    _, _, streamed, finish, _ = stream_chat(client, messages=ASK, temperature=0, max_tokens=120,
                                            tools=[WEATHER, TIME], tool_choice="required")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert finish == "tool_calls" and len({c["id"] for c in streamed}) == len(streamed)


def test_parallel_tool_calls_false_makes_one_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=120,
                                       tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


def test_tool_results_in_the_history(client):
    """An assistant turn with tool_calls and the tool's answer render through the
    model's template, and the model answers from them."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 C"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=20, tools=[WEATHER],
                                       tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_none_is_plain_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=10, tools=[WEATHER],
                                       tool_choice="none")
    assert r.choices[0].message.content and r.choices[0].message.tool_calls in (None, [])


@pytest.mark.parametrize("kw,param", [
    ({"tools": [WEATHER]}, "tool_choice"),  # auto (the default with tools) needs a tool parser
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
])
def test_bad_tool_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)
    assert e.value.body["param"] is not None and e.value.body["param"].startswith(param), e.value.body


def test_media_part_on_a_text_model_is_400(client):
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=5)
    assert "multimodal" in e.value.body["message"] and e.value.body["param"] == "messages[0].content[1]"


def test_text_parts_render_like_a_string(client):
    parts = [{"type": "text", "text": "What is the weather"}, {"type": "text", "text": "in Paris?"}]
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=1)
    assert a.usage.prompt_tokens > 5


# ---------------------------------------------------------------------------- small routes


def test_tokenize_and_detokenize(http):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["token_strs"] == ["Hello", "Ġworld"] and r["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": ASK}).json()
    assert chat["token_strs"] is None and chat["count"] > 10
    bad = http.post("/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"prompt": "x", "messages": ASK}).status_code == 400
    assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404


def test_chat_tokenize_counts_what_a_chat_request_uses(client, http):
    n = http.post("/tokenize", json={"messages": ASK}).json()["count"]
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert r.usage.prompt_tokens == n


def test_version_and_ping(http):
    v = http.get("/version").json()
    assert re.match(r"\d+\.\d+", v["version"]) and v["vllm_gateway"]
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200


def test_a_vllm_client_needs_no_change(gateway_url):
    """Field names and shapes as the installed vLLM's own protocol types parse them."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionStreamResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse

    with httpx.Client(base_url=gateway_url, timeout=120) as h:
        body = {"model": MODEL, "messages": ASK, "max_tokens": 60, "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        ChatCompletionResponse.model_validate(h.post("/v1/chat/completions", json=body).json())
        with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ChatCompletionStreamResponse.model_validate_json(line[6:])
        CompletionResponse.model_validate(h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json())
        TokenizeResponse.model_validate(h.post("/tokenize", json={"prompt": "Hi", "return_token_strs": True}).json())
        DetokenizeResponse.model_validate(h.post("/detokenize", json={"tokens": [1, 2]}).json())
