"""`/v1/messages`: an Anthropic request as the chat request the engines serve
(vLLM renders it and parses tool calls and thinking), and the answer as
Anthropic's message, or its stream of events."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec

from vllm_gateway.gateway.anthropic.errors import sse_error
from vllm_gateway.gateway.anthropic.schemas import (
    BlockDelta,
    BlockStart,
    BlockStop,
    ContentBlock,
    CountTokensRequest,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    OutputUsage,
    StopInfo,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    TokenCount_,
    ToolUseBlock,
    Usage,
)
from vllm_gateway.gateway.engines.client import EngineClient, join_tool_calls
from vllm_gateway.gateway.openai import validation
from vllm_gateway.gateway.openai.calls import Call, Target, Wire, ask_tokens
from vllm_gateway.gateway.openai.errors import APIError
from vllm_gateway.gateway.openai.formatting import Book
from vllm_gateway.gateway.openai.schemas import ChatCompletionRequest, json_encode
from vllm_gateway.protocol.messages import ChatPrompt, Delta, Tokenize, ToolCallDelta


def _event(obj: Any) -> bytes:
    return b"event: " + type(obj).__struct_config__.tag.encode() + b"\ndata: " + json_encode(obj) + b"\n\n"


ANTHROPIC_WIRE = Wire(event=_event, done=b"", error=sse_error)

# ----------------------------------------------------------------------- request


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise APIError(400, f"{where}.source must be of type base64 or url", param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise APIError(400, f"{where} must be a string or text blocks", param=where)


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic messages (and `system`) as chat messages: tool_use blocks become
    an assistant turn's tool calls, tool_result blocks tool messages, thinking
    blocks the turn's reasoning."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": req.system if isinstance(req.system, str)
                    else "".join(b.text for b in req.system)})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be user or assistant", param=f"{where}.role")
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        reasoning: list[str] = []
        for j, block in enumerate(m.content):
            at = f"{where}.content[{j}]"
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and m.role == "user":
                parts.append(_image(block, at))
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise APIError(400, f"{at}: a tool_use block needs an id and a name", param=at)
                calls.append({"id": block["id"], "type": "function", "function": {
                    "name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise APIError(400, f"{at}: a tool_result block needs its tool_use_id", param=at)
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _text(block.get("content", ""), f"{at}.content")})
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                reasoning.append(block.get("thinking") or "")
            else:
                raise APIError(400, f"{at}: a {m.role} message takes no block of type {kind!r}", param=at)
        if not parts and not calls:
            continue
        content: Any = parts
        if all(p["type"] == "text" for p in parts):
            content = "".join(p["text"] for p in parts) if parts else None
        message: dict[str, Any] = {"role": m.role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning"] = "".join(reasoning)
        out.append(message)
    return out


def _tools(req: CountTokensRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    return [{"type": "function", "function": {k: v for k, v in (
        ("name", t.name), ("description", t.description), ("parameters", t.input_schema)) if v is not None}}
        for t in req.tools]


def _tool_choice(req: CountTokensRequest) -> tuple[Any, bool | None]:
    c = req.tool_choice
    if c is None:
        return None, None
    parallel = False if c.disable_parallel_tool_use else None
    if c.type == "auto":
        return "auto", parallel
    if c.type == "any":
        return "required", parallel
    if c.type == "none":
        return "none", parallel
    if c.type == "tool" and c.name:
        return {"type": "function", "function": {"name": c.name}}, parallel
    raise APIError(400, "tool_choice.type must be auto, any, tool (with a name) or none", param="tool_choice")


def _thinking(req: CountTokensRequest) -> tuple[bool, dict[str, Any] | None]:
    """Whether thinking is shown, and the template's switch for it."""
    if req.thinking is None:
        return False, None
    on = req.thinking.type == "enabled"
    if req.thinking.type not in ("enabled", "disabled"):
        raise APIError(400, "thinking.type must be enabled or disabled", param="thinking.type")
    return on, {"enable_thinking": on}


def chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    tool_choice, parallel = _tool_choice(req)
    show_thinking, template_kwargs = _thinking(req)
    body: dict[str, Any] = {"messages": chat_messages(req), "max_tokens": req.max_tokens, "stream": req.stream,
                            "include_reasoning": show_thinking}
    for name, value in (("stop", req.stop_sequences), ("temperature", req.temperature), ("top_p", req.top_p),
                        ("top_k", req.top_k), ("tools", _tools(req)), ("tool_choice", tool_choice),
                        ("parallel_tool_calls", parallel), ("chat_template_kwargs", template_kwargs)):
        if value is not None:
            body[name] = value
    if req.tools and tool_choice is None:
        body["tool_choice"] = "auto"  # Anthropic's default with tools
    try:
        return msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise APIError(400, f"invalid request: {e}", param="messages") from None


def prepare(req: MessagesRequest, model: str) -> Call:
    validation.check_model(req.model, model)
    gen = validation.chat_generate(chat_request(req), f"msg-{uuid.uuid4().hex}")
    gen.model = model
    fmt = MessagesFormatter(gen.request_id, model)
    return Call([gen], fmt, "messages", req.stream, closing=fmt.closing, opening=fmt.opening, wire=ANTHROPIC_WIRE)


async def count_tokens(client: EngineClient, req: CountTokensRequest, engine: Target) -> TokenCount_:
    validation.check_model(req.model, engine.model)
    _, template_kwargs = _thinking(req)
    tools = _tools(req)
    prompt = ChatPrompt(chat_messages(req), chat_template_kwargs=template_kwargs, tools=tools,
                        tool_choice="none" if tools else None)  # tools in the template, no parser needed
    answer = await ask_tokens(client, Tokenize(f"count-{uuid.uuid4().hex}", prompt), "messages", engine.model)
    return TokenCount_(len(answer.token_ids))


# ---------------------------------------------------------------------- response


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as tool_use input (an object)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


class MessagesFormatter:
    """One Anthropic answer: content blocks (thinking, text, tool_use) in the
    order the model wrote them; streamed as Anthropic's events."""

    def __init__(self, request_id: str, model: str) -> None:
        self.book = Book([request_id], 1, model, "msg")
        self.book.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.finish: tuple[str | None, str | int | None] = (None, None)
        self.tools_called = False
        self._blocks: list[str] = []  # kinds of the streamed blocks so far
        self._open: int | None = None  # the streamed block being written (its index)
        self._open_call = -1  # its tool call's index, for tool_use blocks
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._calls: list[ToolCallDelta] = []

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

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            self.book.account(d)
            if d.reasoning:
                self._thinking.append(d.reasoning)
            self._text.append(d.text)
            if d.tool_calls:
                self.tools_called = True
                self._calls = join_tool_calls(self._calls, d.tool_calls)
            if d.finish_reason is not None:
                self.finish = (d.finish_reason, d.stop_reason)

    def response(self) -> Message:
        content: list[ContentBlock] = []
        if self._thinking:
            content.append(ThinkingBlock("".join(self._thinking)))
        text = "".join(self._text)
        if text or not self._calls:
            content.append(TextBlock(text))
        content += [ToolUseBlock(c.id or f"toolu_{uuid.uuid4().hex}", c.name or "", _input(c.arguments))
                    for c in self._calls]
        reason, sequence = self._stop()
        usage = self.book.usage()
        return Message(id=self.book.id, model=self.model, content=content, stop_reason=reason,
                       stop_sequence=sequence, usage=Usage(usage.prompt_tokens, usage.completion_tokens))

    def _stop(self) -> tuple[str | None, str | None]:
        reason, matched = self.finish
        if reason == "length":
            return "max_tokens", None
        if self.tools_called:
            return "tool_use", None
        if isinstance(matched, str):
            return "stop_sequence", matched
        return "end_turn", None
