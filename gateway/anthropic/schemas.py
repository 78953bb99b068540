"""Anthropic Messages API bodies: the request, the message, its content blocks
and stream events, as Anthropic defines them. Structs only."""

from __future__ import annotations

from typing import Annotated, Any, Union

from msgspec import Meta, Struct

from vllm_gateway.gateway.core.schema import MAX_MESSAGES, MAX_STOP, NonNegFloat, TokenCount

# ----------------------------------------------------------------------- request


class MessageParam(Struct, kw_only=True):
    role: str  # user or assistant
    # A string, or content blocks (text, image, tool_use, tool_result, thinking),
    # read by messages.py, which names the block at fault.
    content: str | Annotated[list[dict[str, Any]], Meta(max_length=4096)]


class ToolParam(Struct, kw_only=True, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None  # "custom", or absent


class ToolChoiceParam(Struct, kw_only=True, omit_defaults=True):
    type: str  # auto, any, tool or none
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingParam(Struct, kw_only=True, omit_defaults=True):
    type: str  # enabled or disabled
    budget_tokens: int | None = None


class TextBlockParam(Struct, kw_only=True):
    type: str = "text"
    text: str


class CountTokensRequest(Struct, kw_only=True):
    model: str | None = None
    messages: Annotated[list[MessageParam], Meta(max_length=MAX_MESSAGES)]
    system: str | list[TextBlockParam] | None = None
    tools: Annotated[list[ToolParam], Meta(max_length=1024)] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: TokenCount  # required, as Anthropic requires it
    stop_sequences: Annotated[list[str], Meta(max_length=MAX_STOP)] | None = None
    temperature: NonNegFloat | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


# ----------------------------------------------------------------------- message


class TextBlock(Struct, tag_field="type", tag="text"):
    text: str


class ThinkingBlock(Struct, tag_field="type", tag="thinking"):
    thinking: str
    signature: str = ""


class ToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Union[TextBlock, ThinkingBlock, ToolUseBlock]


class Usage(Struct):
    input_tokens: int
    output_tokens: int


class Message(Struct, kw_only=True):
    id: str
    model: str
    content: list[ContentBlock]
    stop_reason: str | None  # end_turn, max_tokens, stop_sequence, tool_use
    stop_sequence: str | None
    usage: Usage
    role: str = "assistant"
    type: str = "message"


class TokenCount_(Struct):
    input_tokens: int


# ------------------------------------------------------------------------ events


class TextDelta(Struct, tag_field="type", tag="text_delta"):
    text: str


class ThinkingDelta(Struct, tag_field="type", tag="thinking_delta"):
    thinking: str


class InputJsonDelta(Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class MessageStart(Struct, tag_field="type", tag="message_start"):
    message: Message


class BlockStart(Struct, tag_field="type", tag="content_block_start"):
    index: int
    content_block: ContentBlock


class BlockDelta(Struct, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class BlockStop(Struct, tag_field="type", tag="content_block_stop"):
    index: int


class StopInfo(Struct):
    stop_reason: str | None
    stop_sequence: str | None


class OutputUsage(Struct):
    output_tokens: int


class MessageDelta(Struct, tag_field="type", tag="message_delta"):
    delta: StopInfo
    usage: OutputUsage


class MessageStop(Struct, tag_field="type", tag="message_stop"):
    pass


# ------------------------------------------------------------------------ errors


class ErrorDetail(Struct):
    type: str
    message: str


class ErrorBody(Struct, tag_field="type", tag="error"):
    error: ErrorDetail
