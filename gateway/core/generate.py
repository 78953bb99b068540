"""The shared generation request (core/requests.py) -> the wire's `Generate`,
with the cross-field checks msgspec's per-field types cannot express. Every
rejection names its field. Chat, Anthropic's messages, Responses and RunPod's
standard mode all come through here."""

from __future__ import annotations

from typing import Any

import msgspec

from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.requests import (
    ChatCompletionRequest,
    ChatMessageParam,
    Constraints,
    Sampling,
    SamplingFields,
)
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.protocol.messages import ChatPrompt, Generate, SamplingParams, StructuredOutputs

MAX_TOKEN_ID = 2**31 - 1


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404, f"The model `{requested}` does not exist. This server serves `{served}`.",
            param="model", code="model_not_found",
        )


def stream_options(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true", param="stream_options")


def sampling_params(req: Sampling, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    if req.use_beam_search:
        raise APIError(400, "beam search is not supported by the installed vLLM engine", param="use_beam_search")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of ({req.best_of}) must equal n ({req.n}): vLLM V1 has no best-of sampling", param="best_of")
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    logit_bias = None
    if req.logit_bias:
        try:
            logit_bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            logit_bias = {-1: 0.0}
        if not all(0 <= t <= MAX_TOKEN_ID for t in logit_bias):
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias")
    top_k = req.top_k if req.top_k is not None else 0
    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logit_bias=logit_bias,
    )


def chat_messages(messages: list[ChatMessageParam]) -> list[dict[str, Any]]:
    """The messages as vLLM's renderer takes them: dicts with the fields set,
    content parts as the client sent them."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not m.role:
            raise APIError(400, f"messages[{i}].role must be a non-empty string", param=f"messages[{i}].role")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if not isinstance(part.get("type"), str):
                    raise APIError(400, f"messages[{i}].content[{j}] needs a `type` (text, image_url, ...)",
                                   param=f"messages[{i}].content")
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls is not None:
            msg["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
        if reasoning is not None:
            msg["reasoning"] = reasoning
        out.append(msg)
    return out


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json_encode(value).decode()


def structured_outputs(req: Constraints) -> StructuredOutputs | None:
    """The request's constraint, whichever name it came under: vLLM's
    `structured_outputs`, overridden by OpenAI's `response_format` (as vLLM
    does), or one of the older `guided_*` fields. vLLM compiles it in the engine;
    what it refuses is a 400 naming the field it came from."""
    so: StructuredOutputs | None = None
    if req.structured_outputs is not None:
        s = req.structured_outputs
        kinds = [k for k in _KINDS if getattr(s, k) not in (None, False)]
        if len(kinds) > 1:
            raise APIError(400, "structured_outputs takes one kind of constraint, got " + ", ".join(kinds),
                           param="structured_outputs")
        so = StructuredOutputs(
            json=_json_text(s.json) if s.json is not None else None, regex=s.regex, choice=s.choice,
            grammar=s.grammar, json_object=s.json_object,
            structural_tag=_json_text(s.structural_tag) if s.structural_tag is not None else None,
            disable_any_whitespace=s.disable_any_whitespace,
            disable_additional_properties=s.disable_additional_properties,
            whitespace_pattern=s.whitespace_pattern, origin="structured_outputs")
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            kind: dict[str, Any] = {"json_object": True}
        elif rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format.json_schema")
            kind = {"json": _json_text(rf.json_schema.schema_)}
        elif rf.type == "structural_tag":
            kind = {"structural_tag": _json_text(msgspec.to_builtins(rf))}
        else:
            raise APIError(400, f"response_format.type must be text, json_object, json_schema or structural_tag, "
                                f"not {rf.type!r}", param="response_format.type")
        base = so or StructuredOutputs()
        so = msgspec.structs.replace(base, **{**{k: None for k in _KINDS}, **kind}, origin="response_format")
    guided = [(name, value) for name, value in (
        ("guided_json", req.guided_json), ("guided_regex", req.guided_regex),
        ("guided_choice", req.guided_choice), ("guided_grammar", req.guided_grammar)) if value is not None]
    if guided:
        name, value = guided[0]
        if len(guided) > 1 or so is not None:
            other = guided[1][0] if len(guided) > 1 else so.origin  # type: ignore[union-attr]
            raise APIError(400, f"{name} and {other} both constrain the output; use one", param=name)
        kind = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}[name]
        so = StructuredOutputs(**{kind: _json_text(value) if kind == "json" else value},
                               whitespace_pattern=req.guided_whitespace_pattern, origin=name)
    return so


def chat_generate(req: ChatCompletionRequest, request_id: str) -> Generate:
    stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.tools is not None and not req.tools:
        raise APIError(400, "tools must not be an empty list; leave it out instead", param="tools")
    prompt = ChatPrompt(
        messages=chat_messages(req.messages),
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=req.chat_template_kwargs,
        tools=msgspec.to_builtins(req.tools) if req.tools is not None else None,
        tool_choice=msgspec.to_builtins(req.tool_choice) if req.tool_choice is not None else None,
        parallel_tool_calls=req.parallel_tool_calls,
        include_reasoning=req.include_reasoning,
        reasoning_effort=req.reasoning_effort,
        stream=req.stream,
    )
    params = sampling_params(req, max_tokens, logprobs, None)
    params.structured_outputs = structured_outputs(req)
    return Generate(request_id, prompt, params)
