"""Engine deltas -> Anthropic's answer: the message with its content blocks, or
its stream of events."""

from __future__ import annotations

import json
import uuid
from typing import Any

from vllm_gateway.gateway.anthropic.errors import sse_error
from vllm_gateway.gateway.anthropic.schemas import (
    BlockDelta,
    BlockStart,
    BlockStop,
    ContentBlock,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    OutputUsage,
    StopInfo,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from vllm_gateway.gateway.core.answer import OneChoiceAnswer
from vllm_gateway.gateway.core.calls import Wire
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.protocol.messages import Delta, ToolCallDelta


def _event(obj: Any) -> bytes:
    return b"event: " + type(obj).__struct_config__.tag.encode() + b"\ndata: " + json_encode(obj) + b"\n\n"


ANTHROPIC_WIRE = Wire(event=_event, done=b"", error=sse_error)

def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as tool_use input (an object)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


class MessagesFormatter(OneChoiceAnswer):
    """One Anthropic answer: content blocks (thinking, text, tool_use) in the
    order the model wrote them; streamed as Anthropic's events."""

    def __init__(self, request_id: str, model: str) -> None:
        super().__init__(request_id, model, "msg")
        self.book.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.finish: tuple[str | None, str | int | None] = (None, None)
        self.tools_called = False
        self._blocks: list[str] = []  # kinds of the streamed blocks so far
        self._open: int | None = None  # the streamed block being written (its index)
        self._open_call = -1  # its tool call's index, for tool_use blocks

    # ------------------------------------------------------------------ stream

    def opening(self, first: list[Delta]) -> list[Any]:
        usage = Usage(first[0].num_prompt_tokens if first else 0, 0)
        return [MessageStart(Message(id=self.book.id, model=self.model, content=[], stop_reason=None,
                                     stop_sequence=None, usage=usage))]

    def chunks(self, deltas: list[Delta]) -> list[Any]:
        out: list[Any] = []
        for d in deltas:
            self.book.account(d)
            if d.reasoning:
                self._switch(out, "thinking")
                out.append(BlockDelta(self._open, ThinkingDelta(d.reasoning)))
            if d.text:
                self._switch(out, "text")
                out.append(BlockDelta(self._open, TextDelta(d.text)))
            for call in d.tool_calls or []:
                self._switch(out, "tool_use", call)
                if call.arguments:
                    out.append(BlockDelta(self._open, InputJsonDelta(call.arguments)))
            if d.finish_reason is not None:
                self.finish = (d.finish_reason, d.stop_reason)
        return out

    def closing(self) -> list[Any]:
        out: list[Any] = []
        if self._open is not None:
            out.append(BlockStop(self._open))
            self._open = None
        reason, sequence = self._stop()
        out.append(MessageDelta(StopInfo(reason, sequence), OutputUsage(self.book.completion_tokens)))
        out.append(MessageStop())
        return out

    def _switch(self, out: list[Any], kind: str, call: ToolCallDelta | None = None) -> None:
        if self._open is not None and self._blocks[self._open] == kind and (
                call is None or call.index == self._open_call):
            return
        if self._open is not None:
            out.append(BlockStop(self._open))
        self._open = len(self._blocks)
        self._blocks.append(kind)
        block: ContentBlock
        if kind == "thinking":
            block = ThinkingBlock("")
        elif kind == "text":
            block = TextBlock("")
        else:
            assert call is not None
            self.tools_called = True
            self._open_call = call.index
            block = ToolUseBlock(call.id or f"toolu_{uuid.uuid4().hex}", call.name or "", {})
        out.append(BlockStart(self._open, block))

    # ------------------------------------------------------------------- whole

    def response(self) -> Message:
        a = self.answer
        self.finish = (a.finish_reason, a.stop_reason)
        self.tools_called = bool(a.tool_calls)
        content: list[ContentBlock] = []
        if a.reasoning is not None:
            content.append(ThinkingBlock(a.reasoning))
        text = a.text
        if text or not a.tool_calls:
            content.append(TextBlock(text))
        content += [ToolUseBlock(c.id or f"toolu_{uuid.uuid4().hex}", c.name or "", _input(c.arguments))
                    for c in a.tool_calls]
        reason, sequence = self._stop()
        usage = self.book.usage()
        return Message(id=self.book.id, model=self.model, content=content, stop_reason=reason,
                       stop_sequence=sequence, usage=Usage(usage.prompt, usage.completion))

    def _stop(self) -> tuple[str | None, str | None]:
        reason, matched = self.finish
        if reason == "length":
            return "max_tokens", None
        if self.tools_called:
            return "tool_use", None
        if isinstance(matched, str):
            return "stop_sequence", matched
        return "end_turn", None
