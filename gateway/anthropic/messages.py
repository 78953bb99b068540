"""`/v1/messages`: an Anthropic request as the chat request the engines serve
(vLLM renders it and parses tool calls and thinking, as vLLM's own Anthropic
serving does), and `count_tokens`."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec

from vllm_gateway.gateway.anthropic.formatting import ANTHROPIC_WIRE, MessagesFormatter
from vllm_gateway.gateway.anthropic.schemas import CountTokensRequest, MessagesRequest, TokenCount_
from vllm_gateway.gateway.core.calls import Call, Target, ask
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.generate import chat_generate, check_model
from vllm_gateway.gateway.core.requests import ChatCompletionRequest
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.protocol.messages import ChatPrompt, Tokenize

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
    check_model(req.model, model)
    gen = chat_generate(chat_request(req), f"msg-{uuid.uuid4().hex}")
    gen.model = model
    fmt = MessagesFormatter(gen.request_id, model)
    return Call([gen], fmt, "messages", req.stream, closing=fmt.closing, opening=fmt.opening, wire=ANTHROPIC_WIRE)


async def count_tokens(client: EngineClient, req: CountTokensRequest, engine: Target) -> TokenCount_:
    check_model(req.model, engine.model)
    _, template_kwargs = _thinking(req)
    tools = _tools(req)
    prompt = ChatPrompt(chat_messages(req), chat_template_kwargs=template_kwargs, tools=tools,
                        tool_choice="none" if tools else None)  # tools in the template, no parser needed
    answer = await ask(client, Tokenize(f"count-{uuid.uuid4().hex}", prompt), "messages", engine.model)
    return TokenCount_(len(answer.token_ids))
