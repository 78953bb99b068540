"""OpenAI's calls: a chat or completion request prepared as a `Call` (engine
messages and the formatter of its answer), the models list, and vLLM's token
routes."""

from __future__ import annotations

import time
import uuid

import msgspec

from vllm_gateway.gateway.core.calls import Call, Target, ask, no_engine
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.generate import chat_generate, chat_messages, check_model
from vllm_gateway.gateway.core.requests import ChatCompletionRequest
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.openai import validation
from vllm_gateway.gateway.openai.formatting import ChatFormatter, CompletionFormatter
from vllm_gateway.gateway.openai.schemas import (
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from vllm_gateway.protocol.messages import ChatPrompt, Detokenize, Prompt, TextPrompt, Tokenize


def prepare_chat(req: ChatCompletionRequest, model: str, role: str) -> Call:
    check_model(req.model, model)
    gen = chat_generate(req, f"chatcmpl-{uuid.uuid4().hex}")
    gen.model = model
    opts = req.stream_options
    fmt = ChatFormatter(gen.request_id, req.n, model, role, continuous_usage=bool(opts and opts.continuous_usage_stats))
    return Call([gen], fmt, "messages", req.stream, (lambda: [fmt.usage_chunk()]) if opts and opts.include_usage else None,
                lambda first: [fmt.role_chunk()])


def prepare_completion(req: CompletionRequest, model: str, max_model_len: int | None = None) -> Call:
    check_model(req.model, model)
    gens = validation.completion_generates(req, f"cmpl-{uuid.uuid4().hex}", max_model_len)
    for g in gens:
        g.model = model
    opts = req.stream_options
    fmt = CompletionFormatter(
        [g.request_id for g in gens], req.n, model, echo=req.echo,
        continuous_usage=bool(opts and opts.continuous_usage_stats),
    )
    return Call(gens, fmt, "prompt", req.stream, (lambda: [fmt.usage_chunk()]) if opts and opts.include_usage else None)


def model_list(client: EngineClient) -> ModelList:
    served = client.served_models()
    if not served:
        raise no_engine()
    now = int(time.time())
    return ModelList([ModelCard(m.name, now, max_model_len=m.max_model_len or None, root=m.root or None,
                                parent=m.parent) for m in served])


async def tokenize(client: EngineClient, req: TokenizeRequest, engine: Target) -> TokenizeResponse:
    """`POST /tokenize`: the prompt's tokens as a generation of it would see them."""
    check_model(req.model, engine.model)
    prompt: Prompt
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either `prompt` or `messages`", param="prompt")
    if req.messages is not None:
        prompt = ChatPrompt(
            chat_messages(req.messages), add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, chat_template_kwargs=req.chat_template_kwargs,
            tools=msgspec.to_builtins(req.tools) if req.tools else None,
            tool_choice="none" if req.tools else None,  # tools in the template; no tool parser needed
        )
        param = "messages"
    else:
        prompt = TextPrompt(req.prompt or "", True if req.add_special_tokens is None else req.add_special_tokens)
        param = "prompt"
    answer = await ask(client, Tokenize(f"tok-{uuid.uuid4().hex}", prompt, req.return_token_strs), param,
                       engine.model)
    return TokenizeResponse(len(answer.token_ids), engine.max_model_len, answer.token_ids, answer.token_strs)


async def detokenize(client: EngineClient, req: DetokenizeRequest, engine: Target) -> DetokenizeResponse:
    check_model(req.model, engine.model)
    answer = await ask(client, Detokenize(f"detok-{uuid.uuid4().hex}", list(req.tokens)), "tokens",
                       engine.model)
    return DetokenizeResponse(answer.text or "")
