"""Anthropic's operations: handlers and their rows in the table, with
Anthropic's error shape from the first check on."""

from __future__ import annotations

from typing import Union

from vllm_gateway.gateway.anthropic import messages
from vllm_gateway.gateway.anthropic.errors import ANTHROPIC_ERRORS
from vllm_gateway.gateway.anthropic.schemas import (
    BlockDelta,
    BlockStart,
    BlockStop,
    CountTokensRequest,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    TokenCount_,
)
from vllm_gateway.gateway.core.calls import Call, target
from vllm_gateway.gateway.core.operations import Context, Incoming, Operation

MessagesEvent = Union[MessageStart, BlockStart, BlockDelta, BlockStop, MessageDelta, MessageStop]


async def create_message(ctx: Context, r: Incoming) -> Call:
    return messages.prepare(r.body, target(ctx.client, r.body.model).model)


async def count_tokens(ctx: Context, r: Incoming) -> TokenCount_:
    return await messages.count_tokens(ctx.client, r.body, target(ctx.client, r.body.model))


OPERATIONS = (
    Operation("post", "/v1/messages", "Create a message (Anthropic's Messages API; Anthropic's events with "
              "`stream: true`; errors in Anthropic's shape)", create_message, MessagesRequest, Message, MessagesEvent,
              (400, 404, 408, 413, 415, 503, 504), errors_as=ANTHROPIC_ERRORS, work=True),
    Operation("post", "/v1/messages/count_tokens", "Count a message request's input tokens (Anthropic's)",
              count_tokens, CountTokensRequest, TokenCount_, errors=(400, 404, 408, 413, 415, 503),
              errors_as=ANTHROPIC_ERRORS, work=True),
)
