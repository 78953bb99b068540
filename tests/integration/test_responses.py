"""OpenAI's Responses API with the official `openai` client, against the shared
gateway and the real vLLM engine: the same engine path as chat (vLLM renders the
conversation and parses tool calls), formatted as response objects and events."""

import json
import time

import openai
import pytest

from support import MODEL, wait_idle

FRANCE = "What is the capital of France?"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}


def test_create_shapes_and_usage(client, http):
    r = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=40, temperature=0,
                                metadata={"case": "a"}, user="u1")
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert "Paris" in r.output_text and r.output_text == msg.content[0].text
    assert r.metadata == {"case": "a"} and r.user == "u1" and r.max_output_tokens == 40
    # usage counts what a chat request of the same conversation counts
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}],
                                          max_tokens=40, temperature=0)
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.output_text == chat.choices[0].message.content


def test_instructions_and_input_items(client):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!"}]},
        {"type": "message", "role": "user", "content": "What is my name?"},
    ]
    r = client.responses.create(model=MODEL, input=items, instructions="Answer in one short sentence.",
                                max_output_tokens=20, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text and r.instructions.startswith("Answer")


def test_cut_by_length_is_incomplete(client):
    r = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_stream_events_in_order_and_text_joined(client):
    with client.responses.stream(model=MODEL, input=FRANCE, max_output_tokens=200, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == events[-4].text
    whole = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=200, temperature=0)
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_forced_tool_call_round_trip(client):
    choice = {"type": "function", "name": "get_weather"}
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice=choice, max_output_tokens=60, temperature=0)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"} and call.call_id
    with client.responses.stream(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                 tool_choice=choice, max_output_tokens=60, temperature=0) as stream:
        events = list(stream)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == call.arguments
    # the tool's answer goes back as a function_call_output item
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, max_output_tokens=20, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny, 25 C"}])
    assert follow.status in ("completed", "incomplete") and follow.output_text


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                 "strict": True}})
    assert set(json.loads(r.output_text)) == {"city"}


def test_previous_response_id_is_one_conversation(client, http):
    first = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=20, temperature=0)
    second = client.responses.create(model=MODEL, input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=20, temperature=0)
    # the engine saw the whole conversation: as many prompt tokens as a chat with it
    conversation = [{"role": "user", "content": FRANCE},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "And of Germany?"}]
    n = http.post("/tokenize", json={"messages": conversation}).json()["count"]
    assert second.usage.input_tokens == n and second.previous_response_id == first.id


def test_store_get_delete_and_not_found(client):
    r = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=5, temperature=0)
    assert client.responses.retrieve(r.id).output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert e.value.body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope", max_output_tokens=2)
    unstored = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_background_runs_and_cancels(client, engine_endpoint):
    r = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=5, temperature=0, background=True)
    assert r.status == "queued" and r.background
    deadline = time.monotonic() + 60
    while client.responses.retrieve(r.id).status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.2)
    done = client.responses.retrieve(r.id)
    assert done.status == "incomplete" and done.usage.output_tokens == 5  # greedy: cut, never ended early
    # a long answer (a constraint forces 3,000 characters), cancelled while it runs
    long_text = {"type": "object", "properties": {"a": {"type": "string", "minLength": 3000}}, "required": ["a"]}
    long = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=1900, background=True,
                                   text={"format": {"type": "json_schema", "name": "long", "schema": long_text}})
    time.sleep(0.5)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
    assert wait_idle(engine_endpoint[0], 10)  # the engine request was aborted
    assert client.responses.cancel(r.id).status == "incomplete"  # finished: cancelling changes nothing
    foreground = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(foreground.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", background=True, store=False)


STORY = "Write a short poem about the sea."


def _greedy(client, **kw):
    return client.responses.create(model=MODEL, input=STORY, max_output_tokens=30, temperature=0, **kw)


# vLLM's own Responses fields, each with what it must do to the answer (`plain`:
# the greedy answer without it).
SAMPLING = [
    ({"top_k": 1, "temperature": 1.5}, lambda r, plain: r.output_text == plain.output_text),
    ({"min_p": 1.0, "temperature": 1.5}, lambda r, plain: r.output_text == plain.output_text),
    ({"seed": 7, "temperature": 1.5}, lambda r, plain: r.output_text != plain.output_text),
    ({"repetition_penalty": 2.0, "temperature": 0}, lambda r, plain: r.output_text != plain.output_text),
    ({"presence_penalty": 2.0, "frequency_penalty": 2.0, "temperature": 0},
     lambda r, plain: r.output_text != plain.output_text),
    ({"stop": ["ocean"], "temperature": 0},
     lambda r, plain: "ocean" in plain.output_text and plain.output_text.startswith(r.output_text)
     and "ocean" not in r.output_text),
    ({"stop": ["ocean"], "include_stop_str_in_output": True, "temperature": 0},
     lambda r, plain: r.output_text.endswith("ocean") and plain.output_text.startswith(r.output_text)),
    ({"structured_outputs": {"choice": ["calm", "stormy"]}, "temperature": 0},
     lambda r, plain: r.output_text in ("calm", "stormy")),
    ({"ignore_eos": True, "temperature": 0, "max_output_tokens": 120},
     lambda r, plain: r.usage.output_tokens == 120),
    ({"logit_bias": {"198": -100, "28": -100}, "temperature": 0}, lambda r, plain: True),
]


@pytest.mark.parametrize("fields,effect", SAMPLING, ids=lambda v: ",".join(v) if isinstance(v, dict) else "")
def test_vllm_sampling_fields_apply_as_on_the_chat_route(client, fields, effect):
    fields = dict(fields)
    temperature, max_tokens = fields.pop("temperature"), fields.pop("max_output_tokens", 30)
    r = client.responses.create(model=MODEL, input=STORY, max_output_tokens=max_tokens, temperature=temperature,
                                extra_body=fields)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": STORY}],
                                          max_tokens=max_tokens, temperature=temperature, extra_body=fields)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.output_tokens == chat.usage.completion_tokens
    plain = _greedy(client)
    assert effect(r, plain), (r.output_text, plain.output_text)
    if "seed" in fields:  # the same seed, the same answer; another seed, another
        again = client.responses.create(model=MODEL, input=STORY, max_output_tokens=30, temperature=temperature,
                                        extra_body=fields)
        other = client.responses.create(model=MODEL, input=STORY, max_output_tokens=30, temperature=temperature,
                                        extra_body={"seed": 8})
        assert again.output_text == r.output_text != other.output_text


def test_output_logprobs_as_on_the_chat_route(client):
    r = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=8, temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    logprobs = r.output[0].content[0].logprobs
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}], max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert [(lp.token, lp.logprob) for lp in logprobs] == \
        [(lp.token, lp.logprob) for lp in chat.choices[0].logprobs.content]
    assert len(logprobs) == r.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    with client.responses.stream(model=MODEL, input=FRANCE, max_output_tokens=8, temperature=0, top_logprobs=2,
                                 include=["message.output_text.logprobs"]) as stream:
        deltas = [e for e in stream if e.type == "response.output_text.delta"]
    assert [lp.token for e in deltas for lp in e.logprobs] == [lp.token for lp in logprobs]
    plain = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=8, temperature=0)
    assert plain.output[0].content[0].logprobs == []


@pytest.mark.parametrize("field,value", [("priority", 1), ("cache_salt", "salt"), ("truncation", "auto"),
                                         ("vllm_xargs", {"a": 1}), ("request_id", "mine")])
def test_vllm_fields_not_served_are_refused_not_ignored(http, field, value):
    r = http.post("/v1/responses", json={"model": MODEL, "input": "x", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    ok = {"priority": 0, "truncation": "disabled", "cache_salt": None}
    if field in ok:  # the value that asks for nothing is fine
        assert http.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1,
                                                field: ok[field]}).status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": "x", "tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": []}, "input"),
    ({"input": "x", "structured_outputs": {"choice": ["a"]}, "text": {"format": {"type": "json_object"}}},
     "structured_outputs"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"input": "x", "top_k": -2}, "top_k"),
])
def test_bad_requests_are_400_naming_the_field(http, body, param):
    r = http.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].removesuffix("[...]") == param, r.json()
