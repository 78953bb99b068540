"""Unit: every message survives the wire, and the wire is msgpack (no pickle)."""

import msgspec
import pytest

from vllm_gateway.gateway.core.errors import from_failure
from vllm_gateway.protocol.messages import (
    PROTOCOL_VERSION, Abort, ChatPrompt, Delta, EngineStatus, FailureKind, Generate, Hello, Outputs, RequestFailed,
    SamplingParams, TextPrompt, TokenLogprob, TokensPrompt,
    decode_engine_message, decode_gateway_message, encode,
)

GATEWAY_MESSAGES = [
    Hello("gw-1", PROTOCOL_VERSION),
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
    RequestFailed("r1", FailureKind.CONTEXT_TOO_LONG, "too long", param="max_tokens"),
    EngineStatus("0", "abc", "ready", model="m", max_model_len=2048, running=2, waiting=1, kv_cache_usage=0.5,
                 protocol_version=PROTOCOL_VERSION),
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


def test_version_travels_and_old_peers_read_as_version_1():
    assert decode_gateway_message(encode(Hello("gw", PROTOCOL_VERSION))).protocol_version == PROTOCOL_VERSION
    # a version-1 peer sent no version field: messages are arrays, the missing tail takes its default
    assert decode_gateway_message(msgspec.msgpack.encode(["hello", "old-gw"])).protocol_version == 1
    old_status = msgspec.msgpack.encode(["status", "0", "abc", "ready", "m", 2048, 0, 0, 0.0, "", 7])
    assert decode_engine_message(old_status).protocol_version == 1


def test_fields_appended_later_are_ignored_by_older_readers():
    newer = msgspec.msgpack.encode(["hello", "gw", PROTOCOL_VERSION, "a field from the future"])
    assert decode_gateway_message(newer) == Hello("gw", PROTOCOL_VERSION)


@pytest.mark.parametrize("kind,status,type_,code", [
    (FailureKind.BAD_REQUEST, 400, "invalid_request_error", None),
    (FailureKind.CONTEXT_TOO_LONG, 400, "invalid_request_error", "context_length_exceeded"),
    (FailureKind.ENGINE_UNAVAILABLE, 503, "engine_unavailable", None),
    (FailureKind.OVERLOADED, 503, "service_unavailable_error", "overloaded"),
    (FailureKind.INTERNAL, 500, "server_error", None),
])
def test_failure_kinds_map_to_http_in_one_place(kind, status, type_, code):
    err = from_failure(RequestFailed("r", kind, "why", param="prompt"), prompt_param="messages")
    assert (err.status, err.type, err.code, err.param, err.message) == (status, type_, code, "messages", "why")


def test_gateway_does_not_route_to_an_engine_of_another_version(tmp_path):
    """A fake engine answering heartbeats as protocol version 1: never ready."""
    import asyncio

    import zmq
    import zmq.asyncio

    from vllm_gateway.gateway.engines.client import EngineClient

    async def scenario() -> tuple[bool, bool]:
        endpoint = f"ipc://{tmp_path}/old-engine"
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)

        async def answer(version: int) -> None:
            ident, _ = await router.recv_multipart()
            await router.send_multipart([ident, encode(EngineStatus("0", "i1", "ready", "m", 64, protocol_version=version))])

        client = EngineClient([endpoint])
        await client.start()
        try:
            await answer(1)
            await asyncio.sleep(0.1)
            old = client.ready
            await answer(PROTOCOL_VERSION)  # the same engine, upgraded
            await asyncio.sleep(0.1)
            return old, client.ready
        finally:
            await client.close()
            router.close(0)
            ctx.term()

    assert asyncio.run(scenario()) == (False, True)
