"""Anthropic's Messages API with the official `anthropic` client, against the
shared gateway and the real vLLM engine: requests become chat requests (vLLM
renders them and parses tool calls), answers and events Anthropic's."""

import anthropic
import pytest

from support import MODEL

ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"], "additionalProperties": False}}
GREEDY = {"temperature": 0}  # the SDK's typed arguments vary by version; the body field does not


@pytest.fixture(scope="module")
def claude(gateway_url):
    return anthropic.Anthropic(base_url=gateway_url, api_key="unused", max_retries=0, timeout=120)


def test_create_shapes_and_usage(claude, client):
    m = claude.messages.create(model=MODEL, max_tokens=40, messages=ASK, system="Be brief.", extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    [block] = m.content
    assert block.type == "text" and "Paris" in block.text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    chat = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, *ASK])
    assert (m.usage.input_tokens, m.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert block.text == chat.choices[0].message.content


def test_stop_reasons(claude):
    m = claude.messages.create(model=MODEL, max_tokens=3, messages=ASK, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    m = claude.messages.create(model=MODEL, max_tokens=40, messages=ASK, stop_sequences=["Paris"], extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris" and "Paris" not in m.content[0].text


def test_stream_events_in_order_and_text_joined(claude):
    with claude.messages.stream(model=MODEL, max_tokens=40, messages=ASK, extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    raw = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                 "content_block_stop", "message_delta", "message_stop")]
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    whole = claude.messages.create(model=MODEL, max_tokens=40, messages=ASK, extra_body=GREEDY)
    assert text == final.content[0].text == whole.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)
    assert final.stop_reason == whole.stop_reason


def test_forced_tool_use_round_trip(claude):
    kw = dict(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
              extra_body=GREEDY)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = claude.messages.create(messages=ask, **kw)
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"} and use.id
    assert m.stop_reason == "tool_use"
    with claude.messages.stream(messages=ask, **kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert partial and [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    # the result goes back as a tool_result block; the model answers in text
    follow = claude.messages.create(model=MODEL, max_tokens=20, tools=[WEATHER], extra_body=GREEDY, messages=[
        *ask, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 25 C"}]}],
        tool_choice={"type": "none"})
    assert follow.content[0].type == "text" and follow.content[0].text


def test_any_tool_choice_calls_a_tool(claude):
    m = claude.messages.create(model=MODEL, max_tokens=80, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "any"}, extra_body=GREEDY)
    assert m.stop_reason == "tool_use" and [b.name for b in m.content if b.type == "tool_use"] == ["get_weather"]


def test_count_tokens(claude, http):
    n = claude.messages.count_tokens(model=MODEL, messages=ASK, system="Be brief.")
    chat = http.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."}, *ASK]}).json()
    assert n.input_tokens == chat["count"]


def test_errors_in_anthropics_shape(claude, http):
    r = http.post("/v1/messages", json={"model": MODEL, "messages": ASK})  # no max_tokens
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-x", max_tokens=5, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "robot", "content": "x"}])
    r = http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": ASK},
                  headers={"x-api-key": "any", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200
