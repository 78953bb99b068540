"""Completions (and embeddings' inputs) -> engine `Generate` messages, with the
cross-field checks msgspec's per-field types cannot express. Every rejection
names its field. Chat's checks are the shared ones (core/generate.py)."""

from __future__ import annotations

from typing import Any

from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.generate import MAX_TOKEN_ID, sampling_params, stream_options, structured_outputs
from vllm_gateway.gateway.openai.schemas import CompletionRequest
from vllm_gateway.protocol.messages import Generate, Prompt, TextPrompt, TokensPrompt

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS_PER_REQUEST = 256


def _token_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in p)


def completion_prompts(prompt: Any, add_special_tokens: bool) -> list[Prompt]:
    """`prompt` may be a string, a list of strings, a list of token ids or a list
    of lists of token ids."""
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS_PER_REQUEST and not _token_ids(prompt):
        raise APIError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", param="prompt")
    if isinstance(prompt, str):
        prompts: list[Prompt] = [TextPrompt(prompt, add_special_tokens)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [TextPrompt(p, add_special_tokens) for p in prompt]
    elif _token_ids(prompt):
        prompts = [TokensPrompt(list(prompt))]
    elif prompt and all(_token_ids(p) for p in prompt):
        prompts = [TokensPrompt(list(p)) for p in prompt]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                            f"(0..{MAX_TOKEN_ID}) or a list of lists of token ids", param="prompt")
    if any(isinstance(p, TextPrompt) and p.text == "" for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", param="prompt")
    return prompts


def completion_generates(req: CompletionRequest, request_id: str, max_model_len: int | None = None) -> list[Generate]:
    stream_options(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    prompt_logprobs = req.logprobs if (req.echo and req.logprobs is not None) else None
    params = sampling_params(req, max_tokens, req.logprobs, prompt_logprobs)
    params.structured_outputs = structured_outputs(req)
    prompts = completion_prompts(req.prompt, req.add_special_tokens)
    if max_model_len is not None:
        # Token prompts longer than the context are refused here, before they cross the wire.
        longest = max((len(p.token_ids) for p in prompts if isinstance(p, TokensPrompt)), default=0)
        if longest >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                                f"your prompt has {longest} tokens, which leaves no room for a completion.",
                           param="prompt", code="context_length_exceeded")
    if len(prompts) == 1:
        return [Generate(request_id, prompts[0], params, return_prompt=req.echo)]
    return [Generate(f"{request_id}-{i}", p, params, return_prompt=req.echo) for i, p in enumerate(prompts)]
