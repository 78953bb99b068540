"""A Responses API request as the chat request the engine serves: input items
to chat messages (the previous response's conversation in front, when chained),
function tools to chat tools, `text.format` to `response_format`. The engine then
renders and parses it with vLLM's parts, as any chat request."""

from __future__ import annotations

from typing import Any

import msgspec

from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.responses.schemas import (
    UNSERVED_FIELDS,
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    ResponsesRequest,
)
from vllm_gateway.gateway.core.requests import ChatCompletionRequest

_TEXT_PARTS = ("input_text", "output_text", "text")


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: a string, or chat content parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise APIError(400, f"{where}.content[{j}]: parts of type input_text, output_text or input_image "
                                f"(with an image_url) are served, not {kind!r}", param=f"{where}.content")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages. Consecutive function calls become one
    assistant message with several tool calls."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer",
                               param=f"{where}.role")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
                raise APIError(400, f"{where}: a function_call needs call_id, name and arguments (strings)",
                               param=where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise APIError(400, f"{where}: a function_call_output needs its call_id", param=f"{where}.call_id")
            if not isinstance(output, str):
                output = _content(output, where) if isinstance(output, list) else msgspec.json.encode(output).decode()
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # an earlier answer's thought: chat templates drop it from the history
        else:
            raise APIError(400, f"{where}: items of type message, function_call and function_call_output are "
                                f"served, not {kind!r}", param=f"{where}.type")
    return messages


def output_messages(items: list[OutputItem]) -> list[dict[str, Any]]:
    """A stored response's output as the assistant turn of a chat history."""
    text = "".join(p.text for item in items if isinstance(item, OutputMessage) for p in item.content)
    calls = [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in items if isinstance(c, FunctionCallItem)]
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


# Fields a Responses request shares with a chat request, under the same name.
_SHARED = ("temperature", "top_p", "parallel_tool_calls", "user", "top_k", "min_p", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logit_bias",
           "skip_special_tokens", "include_stop_str_in_output", "structured_outputs", "chat_template_kwargs",
           "include_reasoning")

OUTPUT_LOGPROBS = "message.output_text.logprobs"


def wants_logprobs(req: ResponsesRequest) -> bool:
    """Output logprobs, as vLLM gives them: asked by `include`, or by a
    `top_logprobs` above 0 (vLLM would drop it without the include)."""
    return OUTPUT_LOGPROBS in (req.include or []) or bool(req.top_logprobs)


def check_served(req: ResponsesRequest) -> None:
    """A field vLLM honours and this server does not is refused, never ignored."""
    for name, unset in UNSERVED_FIELDS.items():
        value = getattr(req, name)
        if value is not msgspec.UNSET and value != unset:
            raise APIError(400, f"{name} is not supported by this server", param=name)


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]], stream: bool | None = None) -> ChatCompletionRequest:
    """The chat request for `req`, after `history` (the chained conversation);
    `stream` overrides the request's (a background response is always streamed
    into the store)."""
    check_served(req)
    messages = list(history) + input_messages(req.input)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    if not messages:
        raise APIError(400, "input must not be empty", param="input")
    body: dict[str, Any] = {"messages": messages, "stream": req.stream if stream is None else stream}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in _SHARED:
        value = getattr(req, name)
        if value is not None:
            body[name] = msgspec.to_builtins(value)
    if wants_logprobs(req):
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    if req.tools:
        body["tools"] = [{"type": "function", "function": {k: v for k, v in (
            ("name", t.name), ("description", t.description), ("parameters", t.parameters), ("strict", t.strict))
            if v is not None}} for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text" and req.structured_outputs is not None:
        raise APIError(400, "structured_outputs and text.format both constrain the output; use one",
                       param="structured_outputs")
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise APIError(400, "text.format of type json_schema needs a schema", param="text.format.schema")
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
        elif fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        else:
            raise APIError(400, f"text.format.type must be text, json_object or json_schema, not {fmt.type!r}",
                           param="text.format.type")
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    try:
        return msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise APIError(400, f"invalid input: {e}", param="input") from None


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be none, auto, required or a function, not {choice!r}",
                           param="tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, 'a tool_choice object must be {"type": "function", "name": ...}', param="tool_choice")
