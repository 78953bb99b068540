"""Messages between gateway and engine, and their msgpack codec.

One engine binds a ZeroMQ ROUTER; every gateway connects a DEALER to it. Each frame
is one msgpack-encoded message from the unions below, sent as an array (`array_like`:
no field names on the wire) whose first element, the tag, says which message it is.
Only msgpack crosses the wire. The per-step messages (`Outputs`, `Delta`,
`TokenLogprob`) are `gc=False`: they hold no cycles, and tens of thousands of them
a second would otherwise keep the garbage collector busy.

Rules for changing this module, so that a gateway and an engine of different
builds either understand each other or say clearly that they do not:
- fields are only ever appended to a message, with a default; never removed,
  reordered or retyped (messages are arrays: position is meaning);
- anything else (a new tag's meaning, a changed field) bumps `PROTOCOL_VERSION`.
Both sides exchange the version in the handshake (`Hello` / `EngineStatus`); an
engine refuses the requests of a gateway of another version, and a gateway does
not route to an engine of another version; both log why.
"""

from __future__ import annotations

import enum
from typing import Any, Literal, Union

import msgspec

from vllm_gateway.protocol.metrics import EngineMetrics

# 1: before versioning (failures carried an HTTP status); 2: failure kinds;
# 3: structured outputs, chat requests rendered by vLLM (tools, reasoning), parsed
#    deltas, tokenize/detokenize. A version-2 engine would ignore a constraint it
#    does not know and answer unconstrained: hence a new version, not just fields;
# 4: models (LoRA adapters, embedding models) named in requests and reported in
#    status, embeddings, adapters loaded at run time;
# 5: a status counts the requests its gateway sent that the engine has taken
#    (`EngineStatus.received`); a gateway counts the rest as load of its own,
#    which a version-4 engine's status (no count) would wipe out;
# 6: a status counts the gateway's own generations in the engine
#    (`EngineStatus.in_engine`); a gateway counts its own from what it has in
#    flight, and a version-5 status would have it count them twice.
PROTOCOL_VERSION = 6

# --------------------------------------------------------------------------- prompt


class TextPrompt(msgspec.Struct, tag="text", array_like=True, omit_defaults=True):
    """Raw text, tokenized by the engine with the model's tokenizer."""

    text: str
    add_special_tokens: bool = True


class TokensPrompt(msgspec.Struct, tag="tokens", array_like=True):
    """Token ids given by the client, used as they are."""

    token_ids: list[int]


class ChatPrompt(msgspec.Struct, tag="chat", array_like=True, omit_defaults=True):
    """An OpenAI chat request's prompt side; the engine renders it with vLLM's
    renderer (chat template, content formats, tools) and parses the output with
    vLLM's tool and reasoning parsers."""

    # OpenAI messages as the client sent them (content parts included), with
    # their known fields checked by the gateway.
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI function tools and tool_choice ("none", "auto", "required" or
    # {"type": "function", "function": {"name": ...}}), as the client sent them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True
    reasoning_effort: str | None = None
    # False: the client reads the whole answer at once, so the engine parses the
    # whole output when it ends (vLLM's non-streaming parse), not piece by piece.
    stream: bool = True


Prompt = Union[TextPrompt, TokensPrompt, ChatPrompt]


class StructuredOutputs(msgspec.Struct, omit_defaults=True):
    """vLLM's `StructuredOutputsParams`: one constraint (json, regex, choice,
    grammar, json_object or structural_tag) and its options. `origin` names the
    request field it came from, for the error when vLLM refuses it."""

    json: str | None = None  # a JSON schema, as JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None  # as JSON text
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    origin: str = "structured_outputs"


class SamplingParams(msgspec.Struct, omit_defaults=True):
    """What vLLM's SamplingParams needs, already validated by the gateway.

    `max_tokens=None` means "up to the context length", decided by the engine
    once it knows the prompt's length.
    """

    n: int = 1
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputs | None = None


# ------------------------------------------------------------- gateway -> engine


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """Sent on connect and then periodically: a heartbeat the engine answers
    with its `EngineStatus`. `gateway_id` names the sender in the engine's logs."""

    gateway_id: str
    protocol_version: int = 1  # absent from version-1 gateways


class Generate(msgspec.Struct, tag="gen", array_like=True, omit_defaults=True):
    request_id: str
    prompt: Prompt
    params: SamplingParams
    # Ask the engine to send back the prompt's text (for completions' `echo`).
    return_prompt: bool = False
    # The model asked for: "" or the base model, or one of the engine's LoRA adapters.
    model: str = ""


class Embed(msgspec.Struct, tag="embed", array_like=True, omit_defaults=True):
    """Embed each input (a text or token ids) with the engine's pooling model.
    Answered by `Embeddings`, or `RequestFailed`."""

    request_id: str
    inputs: list[Union[TextPrompt, TokensPrompt]]
    dimensions: int | None = None  # Matryoshka models: keep the first N
    normalize: bool | None = None  # None: as the model's pooler does
    truncate_prompt_tokens: int | None = None


class LoadAdapter(msgspec.Struct, tag="lora+", array_like=True):
    """Load a LoRA adapter now, served as `name`. Answered by `Done`."""

    request_id: str
    name: str
    path: str


class UnloadAdapter(msgspec.Struct, tag="lora-", array_like=True):
    """Stop serving a LoRA adapter. Answered by `Done`."""

    request_id: str
    name: str


class Abort(msgspec.Struct, tag="abort", array_like=True):
    """Stop these requests now and free their slots; no reply is sent."""

    request_ids: list[str]


class Tokenize(msgspec.Struct, tag="tok", array_like=True, omit_defaults=True):
    """Tokenize a prompt as a generation would (a chat prompt rendered by vLLM's
    renderer first). Answered by `Tokens`, or `RequestFailed`."""

    request_id: str
    prompt: Prompt
    return_token_strs: bool = False


class Detokenize(msgspec.Struct, tag="detok", array_like=True):
    """Token ids back to text. Answered by `Tokens` (its `text`), or `RequestFailed`."""

    request_id: str
    token_ids: list[int]


GatewayMessage = Union[Hello, Generate, Abort, Tokenize, Detokenize, Embed, LoadAdapter, UnloadAdapter]


# ------------------------------------------------------------- engine -> gateway


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token, which has none
    # The most likely alternatives at this position: (token, logprob, token_id).
    top: list[tuple[str, float, int]] = []


class ToolCallDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A piece of one tool call of a choice, as vLLM's tool parsers stream it:
    `id` and `name` come first (once), `arguments` text after, in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """New output of one choice (`index`) of one request since the last delta.

    For a chat request, `text` is the answer's content only: vLLM's parsers in
    the engine have moved the model's reasoning to `reasoning` and its tool
    calls to `tool_calls`."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    finish_reason: str | None = None
    # The stop string or stop token id that ended the choice, if any.
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    # Only on a request's first delta, and only when asked for.
    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    # With a reasoning parser: the choice's reasoning tokens so far (usage details).
    reasoning_tokens: int | None = None


class Outputs(msgspec.Struct, tag="out", array_like=True, gc=False):
    """The deltas of all of one gateway's requests from one engine step."""

    deltas: list[Delta]


class FailureKind(enum.IntEnum):
    """Why a request failed, as the engine knows it. The gateway alone maps a kind
    to an HTTP status and an OpenAI error type and code (gateway/errors.py)."""

    BAD_REQUEST = 1  # the request is invalid (vLLM's own validation included)
    CONTEXT_TOO_LONG = 2  # prompt plus max_tokens beyond the model's context
    ENGINE_UNAVAILABLE = 3  # the engine died, restarted, stopped or lost contact
    OVERLOADED = 4  # the engine refused more work for now (admission control)
    INTERNAL = 5  # a bug: the message says what
    NOT_FOUND = 6  # the model or adapter named is not served (any more)


class RequestFailed(msgspec.Struct, tag="fail", array_like=True, omit_defaults=True):
    """The request ended with an error; no more deltas follow for it."""

    request_id: str
    kind: FailureKind
    message: str
    param: str | None = None  # the request field at fault, when one is


class Tokens(msgspec.Struct, tag="toks", array_like=True, omit_defaults=True):
    """The answer to `Tokenize` (token ids, and their strings when asked) or to
    `Detokenize` (`text`)."""

    request_id: str
    token_ids: list[int] = []
    token_strs: list[str] | None = None
    text: str | None = None


class Embeddings(msgspec.Struct, tag="embs", array_like=True):
    """The answer to `Embed`: a vector per input, and the tokens each used."""

    request_id: str
    vectors: list[list[float]]
    num_prompt_tokens: list[int]


class Done(msgspec.Struct, tag="done", array_like=True):
    """The answer to `LoadAdapter` / `UnloadAdapter`."""

    request_id: str
    message: str


class ModelInfo(msgspec.Struct, array_like=True, omit_defaults=True):
    """One model an engine serves: its base model, or a LoRA adapter of it."""

    name: str
    task: str = "generate"  # generate or embed
    parent: str | None = None  # a LoRA adapter's base model
    root: str = ""  # where it was loaded from
    max_model_len: int = 0


# draining: stopping, its requests still running (none new: the gateways route
# elsewhere and keep what runs there); stopping: going now, its requests lost.
EngineState = Literal["loading", "ready", "failed", "draining", "stopping"]


class EngineStatus(msgspec.Struct, tag="status", array_like=True):
    """The engine's answer to `Hello`; also its load report."""

    engine_id: str
    # Random per engine process: a new value means the engine was restarted and
    # knows nothing of requests sent to its previous life.
    instance: str
    state: EngineState
    model: str = ""
    max_model_len: int = 0
    # Requests in the engine now, split as vLLM's scheduler last counted them:
    # those that arrived since its last step count as waiting, those gone since
    # no longer count.
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    error: str = ""
    pid: int = 0  # the engine process, for operators and supervisors
    protocol_version: int = 1  # absent from version-1 engines
    vllm_version: str = ""  # the engine's vLLM, for GET /version
    models: list[ModelInfo] = []  # what it serves: its model, and its LoRA adapters
    kv_cache_tokens: int = 0  # the KV cache's size in tokens (blocks x block size), for routing
    # vLLM's cache config (for routers' prefix scoring: vllm:cache_config_info).
    block_size: int = 0
    num_gpu_blocks: int = 0
    # With LoRA (vllm:lora_requests_info): the most adapters in a batch, and the
    # adapters of the scheduler's running and waiting requests now.
    max_loras: int = 0
    running_lora_adapters: list[str] = []
    waiting_lora_adapters: list[str] = []
    # Version 5's count of the gateway's requests taken, ever; no longer sent
    # (`in_engine` says more), kept for the wire's order.
    received: int = 0
    # Of `running` + `waiting`, the generations of the gateway this status goes
    # to (n each, as the scheduler counts). The gateway knows its own better than
    # any report: those sent since are on their way, those ended since are gone
    # (a report counts a request that just ended until the next one).
    in_engine: int = 0


EngineMessage = Union[Outputs, RequestFailed, EngineStatus, EngineMetrics, Tokens, Embeddings, Done]


# --------------------------------------------------------------------------- codec

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
"""Encode any message of this module to bytes."""

decode_gateway_message = msgspec.msgpack.Decoder(GatewayMessage).decode
"""Decode what a gateway sent (used by the engine)."""

decode_engine_message = msgspec.msgpack.Decoder(EngineMessage).decode
"""Decode what an engine sent (used by the gateway)."""
