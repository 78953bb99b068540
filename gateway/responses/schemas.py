"""OpenAI Responses API bodies (`/v1/responses`): the request, the response
object, its output items and its stream events, as OpenAI defines them. Structs
only; the conversion to a chat request is `convert.py`, the formatting
`formatting.py`."""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from vllm_gateway.gateway.core.answer import OutputLogprob
from vllm_gateway.gateway.core.requests import StructuredOutputsParam
from vllm_gateway.gateway.core.schema import (
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

# ----------------------------------------------------------------------- request


class FunctionTool(Struct, kw_only=True, omit_defaults=True):
    """A function tool, in the Responses API's flat shape."""

    type: str = "function"
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(Struct, kw_only=True, omit_defaults=True):
    type: str = "text"  # text, json_object or json_schema
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class TextConfig(Struct, kw_only=True, omit_defaults=True):
    format: TextFormat | None = None


class ReasoningConfig(Struct, kw_only=True, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None


# At most 16 pairs, keys of 64 characters, values of 512: OpenAI's bounds
# (metadata is stored with the response and echoed back).
Metadata = Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
                     Meta(max_length=16)]

# Input items (messages, function calls and their outputs) arrive as objects of
# several shapes; `convert.py` reads them and names the item at fault.
InputItems = Annotated[list[dict[str, Any]], Meta(max_length=4096)]


class ResponsesRequest(Struct, kw_only=True):
    model: str | None = None
    input: str | InputItems
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    temperature: NonNegFloat | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=1024)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Metadata | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    stream: bool = False
    # "message.output_text.logprobs" adds output tokens' logprobs (with
    # `top_logprobs` alternatives); other values add nothing.
    include: list[str] | None = None
    top_logprobs: TopLogprobs | None = None
    # vLLM's own ResponsesRequest fields: applied as the chat route applies them.
    top_k: TopK | None = None
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: str | StopStrings | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    logit_bias: LogitBias | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParam | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True
    # Accepted as vLLM accepts them, and ignored as vLLM ignores them.
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    # What vLLM honours and this server does not: refused when set, never ignored.
    priority: Any = msgspec.UNSET
    cache_salt: Any = msgspec.UNSET
    truncation: Any = msgspec.UNSET
    max_tool_calls: Any = msgspec.UNSET
    prompt: Any = msgspec.UNSET
    request_id: Any = msgspec.UNSET
    previous_input_messages: Any = msgspec.UNSET
    enable_response_messages: Any = msgspec.UNSET
    vllm_xargs: Any = msgspec.UNSET
    kv_transfer_params: Any = msgspec.UNSET
    mm_processor_kwargs: Any = msgspec.UNSET
    media_io_kwargs: Any = msgspec.UNSET


# The refused fields above, with the value that means "not asked for".
UNSERVED_FIELDS = {"priority": 0, "cache_salt": None, "truncation": "disabled", "max_tool_calls": None,
                   "prompt": None, "request_id": None, "previous_input_messages": None,
                   "enable_response_messages": False, "vllm_xargs": None, "kv_transfer_params": None,
                   "mm_processor_kwargs": None, "media_io_kwargs": None}


# ---------------------------------------------------------------------- response


class OutputText(Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[OutputLogprob] = []


class ReasoningText(Struct, tag_field="type", tag="reasoning_text"):
    text: str


class OutputMessage(Struct, tag_field="type", tag="message"):
    id: str
    content: list[OutputText]
    role: str = "assistant"
    status: str = "completed"


class FunctionCallItem(Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


class ReasoningItem(Struct, tag_field="type", tag="reasoning"):
    id: str
    summary: list[Any]
    content: list[ReasoningText]
    status: str = "completed"


OutputItem = Union[OutputMessage, FunctionCallItem, ReasoningItem]


class InputTokensDetails(Struct):
    cached_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class IncompleteDetails(Struct):
    reason: str


class ResponseError(Struct):
    code: str
    message: str


class Response(Struct, kw_only=True):
    id: str
    created_at: int
    model: str
    status: str  # queued, in_progress, completed, incomplete, cancelled, failed
    output: list[OutputItem] = []
    output_text: str = ""  # the SDKs' convenience: all output_text joined
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] = []
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    object: str = "response"


class DeletedResponse(Struct):
    id: str
    deleted: bool = True
    object: str = "response"


# ------------------------------------------------------------------------ events
# Each streamed event is one of these; `sequence_number` counts them from 0.


class ResponseEvent(Struct, tag_field="type", kw_only=True):
    sequence_number: int = 0


class Created(ResponseEvent, tag="response.created"):
    response: Response


class InProgress(ResponseEvent, tag="response.in_progress"):
    response: Response


class Completed(ResponseEvent, tag="response.completed"):
    response: Response


class Incomplete(ResponseEvent, tag="response.incomplete"):
    response: Response


class Failed(ResponseEvent, tag="response.failed"):
    response: Response


class ItemAdded(ResponseEvent, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class ItemDone(ResponseEvent, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class _ContentEvent(ResponseEvent):
    """An event about one content part of one output item."""

    item_id: str
    output_index: int
    content_index: int


class PartAdded(_ContentEvent, tag="response.content_part.added"):
    part: OutputText | ReasoningText


class PartDone(_ContentEvent, tag="response.content_part.done"):
    part: OutputText | ReasoningText


class TextDelta(_ContentEvent, tag="response.output_text.delta"):
    delta: str
    logprobs: list[OutputLogprob] = []


class TextDone(_ContentEvent, tag="response.output_text.done"):
    text: str
    logprobs: list[OutputLogprob] = []


class ReasoningDelta(_ContentEvent, tag="response.reasoning_text.delta"):
    delta: str


class ReasoningDone(_ContentEvent, tag="response.reasoning_text.done"):
    text: str


class ArgumentsDelta(ResponseEvent, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(ResponseEvent, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    arguments: str
    name: str | None = None


class ErrorEvent(ResponseEvent, tag="error"):
    message: str
    code: str | None = None
    param: str | None = None


# Every streamed event, as one union (for /openapi.json and to read stored events back).
ResponseStreamEvent = Union[Created, InProgress, ItemAdded, PartAdded, TextDelta, TextDone, PartDone, ReasoningDelta,
                            ReasoningDone, ArgumentsDelta, ArgumentsDone, ItemDone, Completed, Incomplete, Failed,
                            ErrorEvent]
