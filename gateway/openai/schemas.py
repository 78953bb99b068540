"""OpenAI's bodies beyond the shared chat request (core/requests.py): completions,
tokens, embeddings, adapters, and the objects the gateway answers with."""

from __future__ import annotations

from typing import Annotated, Any, Union

from msgspec import Meta, Struct

from vllm_gateway.gateway.core.answer import OutputLogprob
from vllm_gateway.gateway.core.requests import ChatMessages, SamplingFields, Tool
from vllm_gateway.gateway.core.schema import PositiveInt, TokenId, TopLogprobs

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


class CompletionTokensDetails(Struct):
    reasoning_tokens: int


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # With a reasoning parser (as vLLM reports it).
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatLogprobs(Struct):
    content: list[OutputLogprob]


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


