"""OpenAI HTTP bodies: the requests the gateway accepts and the objects it returns.

Requests are decoded and type-checked by msgspec straight from the HTTP body, so a
wrong type or an out-of-range value comes back as an error naming the field
(`Expected int >= 1 - at $.n`). Cross-field rules live in `gateway/requests.py`.
Unknown fields are ignored, as OpenAI and vLLM do (also inside chat messages,
whose known fields are typed). Integers are bounded to what the wire (msgpack,
64 bits) can carry, and lists to sizes an engine can serve without stalling: a
value beyond either is a 400 naming the field, never a server error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

# ------------------------------------------------------------------ shared pieces

NonNegFloat = Annotated[float, Meta(ge=0.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**63 - 1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
ChoiceCount = Annotated[int, Meta(ge=1, le=128)]
# Token ids and token counts: what the wire carries (int64), and no model has more.
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
TokenCount = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
# Limits on list sizes (OpenAI allows 4 stop strings; vLLM sets none).
MAX_STOP = 256
MAX_STOP_TOKEN_IDS = 4096
MAX_LOGIT_BIAS = 2048
MAX_MESSAGES = 4096


class StreamOptions(Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(Struct, kw_only=True, omit_defaults=True):
    name: str = "response"
    description: str | None = None
    # `schema` on the wire; a field of that name would shadow Struct internals in tools.
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True, omit_defaults=True):
    """`text`, `json_object`, `json_schema` (OpenAI) or `structural_tag` (vLLM)."""

    type: str
    json_schema: JsonSchemaFormat | None = None
    # structural_tag (vLLM): the rest of the object is the tag's definition.
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class StructuredOutputsParam(Struct, kw_only=True, omit_defaults=True):
    """vLLM's `structured_outputs` request field."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: Annotated[list[str], Meta(max_length=4096)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class Constraints(Struct, kw_only=True):
    """Structured outputs, under every name clients send: OpenAI's
    `response_format`, vLLM's `structured_outputs`, and the `guided_*` fields
    of older vLLM versions that worker-vllm users still send."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParam | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Meta(max_length=4096)] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None


class Sampling(Constraints, kw_only=True):
    """Sampling parameters (OpenAI's and vLLM's extras, structured outputs among
    them): shared by chat, completions and RunPod's standard `sampling_params`."""

    n: ChoiceCount = 1
    best_of: ChoiceCount | None = None
    temperature: NonNegFloat | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    length_penalty: float = 1.0
    use_beam_search: bool = False
    early_stopping: bool | str = False
    seed: Seed | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    max_tokens: TokenCount | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Annotated[
        dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=MAX_LOGIT_BIAS)
    ] | None = None


class SamplingFields(Sampling, kw_only=True):
    """What chat and completions requests share beyond sampling."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


# ----------------------------------------------------------------------- requests


# Content parts (text, or media: `image_url`, `input_audio`, `video_url`, ...) are
# forwarded as the client sent them: vLLM's renderer reads them, and hands media to
# a model that takes it. Here only each part's `type` is checked (validation.py).
ContentParts = Annotated[list[dict[str, Any]], Meta(max_length=4096)]


class ToolCallFunctionParam(Struct):
    name: str
    arguments: str


class ToolCallParam(Struct, kw_only=True):
    """A tool call of an assistant message in the history."""

    id: str
    type: str = "function"
    function: ToolCallFunctionParam


class ChatMessageParam(Struct, kw_only=True, omit_defaults=True):
    """One chat message, as vLLM's renderer receives it. Fields beyond these
    are dropped (as vLLM does), so nothing unchecked reaches the engine."""

    role: str
    content: str | ContentParts | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # an earlier answer's reasoning (vLLM's name)
    reasoning_content: str | None = None  # the other common name for it


ChatMessages = Annotated[list[ChatMessageParam], Meta(max_length=MAX_MESSAGES)]


class FunctionDefinition(Struct, kw_only=True, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, kw_only=True):
    type: str = "function"
    function: FunctionDefinition


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    type: str = "function"
    function: NamedFunction


ToolChoice = Union[str, NamedToolChoice]


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: ChatMessages
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[Tool], Meta(max_length=1024)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True
    reasoning_effort: str | None = None


# str | list[str] | list[int] | list[list[int]]: msgspec cannot tell list types
# apart in a union, so the list's items are checked in gateway/requests.py.
CompletionPrompt = Union[str, list[Any]]


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: CompletionPrompt
    suffix: str | None = None
    echo: bool = False
    logprobs: TopLogprobs | None = None
    add_special_tokens: bool = True


class TokenizeRequest(Struct, kw_only=True):
    """`POST /tokenize` as vLLM takes it: a completion-style `prompt`, or a
    chat-style `messages` (rendered as a chat request would be)."""

    model: str | None = None
    prompt: str | None = None
    messages: ChatMessages | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[Tool], Meta(max_length=1024)] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: Annotated[list[TokenId], Meta(max_length=1_000_000)]


class EmbeddingRequest(Struct, kw_only=True):
    """`POST /v1/embeddings`: `input` a string, a list of strings, token ids or
    lists of token ids (checked in validation.py, as completions' prompt)."""

    model: str | None = None
    input: CompletionPrompt
    encoding_format: str = "float"  # float or base64
    dimensions: PositiveInt | None = None
    user: str | None = None
    truncate_prompt_tokens: PositiveInt | None = None  # vLLM's: keep the last N tokens of each input
    normalize: bool | None = None  # vLLM's: None keeps the model's pooler setting


class LoadLoraRequest(Struct, kw_only=True):
    lora_name: Annotated[str, Meta(min_length=1, max_length=256)]
    lora_path: Annotated[str, Meta(min_length=1)]
    base_model_name: str | None = None  # which base model's engines load it (default: the first served)


class UnloadLoraRequest(Struct, kw_only=True):
    lora_name: Annotated[str, Meta(min_length=1, max_length=256)]
    lora_int_id: int | None = None  # accepted, as vLLM takes it; the name decides


# ---------------------------------------------------------------------- responses


class Embedding(Struct):
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32
    object: str = "embedding"


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct):
    prompt: str


class Version(Struct):
    version: str  # the engines' vLLM, as `vllm serve` answers
    vllm_gateway: str


class CompletionTokensDetails(Struct):
    reasoning_tokens: int


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # With a reasoning parser (as vLLM reports it).
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionCall(Struct):
    name: str
    arguments: str


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessage(Struct):
    role: str
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = []


class ChatChoice(Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class DeltaFunctionCall(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Struct, omit_defaults=True):
    """A piece of a tool call: `id`, `type` and the name first, arguments after."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "vllm-gateway"
    max_model_len: int | None = None
    root: str | None = None  # where the model (or adapter) was loaded from
    parent: str | None = None  # a LoRA adapter's base model
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class EngineHealth(Struct):
    """One engine as a gateway sees it."""

    endpoint: str
    ready: bool
    state: str  # loading, ready, failed, stopping, or unreachable
    engine_id: str | None
    pid: int | None
    running: int
    waiting: int
    kv_cache_usage: float
    in_flight: int  # this gateway's requests on the engine now
    routed: int  # this gateway's requests sent to the engine, ever


class Health(Struct):
    status: str  # ok, unavailable, or draining
    engines: list[EngineHealth]


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(Struct):
    error: ErrorInfo


json_encode = msgspec.json.Encoder().encode
decode_chat_request = msgspec.json.Decoder(ChatCompletionRequest).decode
decode_completion_request = msgspec.json.Decoder(CompletionRequest).decode
decode_tokenize_request = msgspec.json.Decoder(TokenizeRequest).decode
decode_embedding_request = msgspec.json.Decoder(EmbeddingRequest).decode
decode_load_lora_request = msgspec.json.Decoder(LoadLoraRequest).decode
decode_unload_lora_request = msgspec.json.Decoder(UnloadLoraRequest).decode
decode_detokenize_request = msgspec.json.Decoder(DetokenizeRequest).decode


def from_dict(type_: type) -> Callable[[Any], Any]:
    """A checker for inputs that arrive already parsed (RunPod jobs): builtins in,
    `type_` out, with the same checks as the HTTP decoders."""
    return lambda obj: msgspec.convert(obj, type_)


chat_request_from_dict = from_dict(ChatCompletionRequest)
completion_request_from_dict = from_dict(CompletionRequest)
tokenize_request_from_dict = from_dict(TokenizeRequest)
detokenize_request_from_dict = from_dict(DetokenizeRequest)
embedding_request_from_dict = from_dict(EmbeddingRequest)
