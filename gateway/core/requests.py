"""The generation request every chat-shaped intake converts to: OpenAI's chat
request as vLLM takes it (vLLM's own Anthropic and Responses serving convert to
it too), and the sampling and constraint fields completions and RunPod's
standard mode share. `core/generate.py` turns them into the wire's `Generate`.

Requests are decoded and type-checked by msgspec straight from the body, so a
wrong type or an out-of-range value comes back as an error naming the field
(`Expected int >= 1 - at $.n`). Unknown fields are ignored, as OpenAI and vLLM
do (also inside chat messages, whose known fields are typed)."""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from vllm_gateway.gateway.core.schema import (
    MAX_MESSAGES,
    ChoiceCount,
    LogitBias,
    NonNegFloat,
    Penalty,
    Probability,
    RepetitionPenalty,
    Seed,
    StopStrings,
    StopTokenIds,
    TokenCount,
    TopK,
    TopLogprobs,
)

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
    top_k: TopK | None = None
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    length_penalty: float = 1.0
    use_beam_search: bool = False
    early_stopping: bool | str = False
    seed: Seed | None = None
    stop: str | StopStrings | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    max_tokens: TokenCount | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: LogitBias | None = None


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

