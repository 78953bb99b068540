"""Requests in: a `Generate` as vLLM's `AsyncLLM.generate` takes it (the prompt's
token ids and vLLM's sampling parameters), checked against the model's context
(the input side, as vLLM's own `input_processor.py` is)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
from vllm import SamplingParams as VllmSamplingParams
from vllm.sampling_params import RequestOutputKind

from vllm_gateway.protocol.messages import ChatPrompt, FailureKind, Generate, SamplingParams, TextPrompt, TokensPrompt

# Prompts longer than this (in characters) are tokenized off the event loop.
TOKENIZE_INLINE_MAX_CHARS = 8192


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, kind: FailureKind = FailureKind.BAD_REQUEST) -> None:
        super().__init__(message)
        self.param = param
        self.kind = kind


@dataclasses.dataclass
class Rendered:
    prompt_ids: list[int]
    prompt_text: str | None  # only when the gateway asked for it (`return_prompt`), or already at hand
    params: VllmSamplingParams


def sampling_params(p: SamplingParams, max_tokens: int) -> VllmSamplingParams:
    """vLLM sampling parameters (our fields carry vLLM's names), streaming deltas.
    vLLM validates them again and raises on what it rejects."""
    fields = msgspec.structs.asdict(p)
    fields.update(max_tokens=max_tokens, stop=p.stop or None, stop_token_ids=p.stop_token_ids or None)
    return VllmSamplingParams(**fields, output_kind=RequestOutputKind.DELTA)


class InputRenderer:
    """Renders requests for one model: its tokenizer, context length, chat template."""

    def __init__(self, tokenizer: Any, max_model_len: int, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chat_template = chat_template

    async def render(self, req: Generate) -> Rendered:
        """Raises `BadRequest` for what the request got wrong (a prompt the chat
        template refuses, token ids out of the vocabulary, no room in the context)."""
        ids, text = await self._prompt(req)
        return Rendered(ids, text, sampling_params(req.params, self.max_tokens(len(ids), req.params.max_tokens)))

    def max_tokens(self, num_prompt: int, requested: int | None) -> int:
        limit = self.max_model_len
        if requested is None:
            if num_prompt >= limit:
                raise BadRequest(
                    f"This model's maximum context length is {limit} tokens. However, your prompt "
                    f"has {num_prompt} tokens, which leaves no room for a completion.",
                    "prompt", FailureKind.CONTEXT_TOO_LONG,
                )
            return limit - num_prompt
        if num_prompt + requested > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} in the "
                f"completion). Please reduce the length of the prompt or of max_tokens.",
                "max_tokens" if num_prompt < limit else "prompt", FailureKind.CONTEXT_TOO_LONG,
            )
        return requested

    async def _prompt(self, req: Generate) -> tuple[list[int], str | None]:
        """The prompt's token ids, and its text when the gateway asked for it."""
        p = req.prompt
        tok = self.tokenizer
        if isinstance(p, TokensPrompt):
            vocab = len(tok)
            bad = next((t for t in p.token_ids if t < 0 or t >= vocab), None)
            if bad is not None:
                raise BadRequest(f"token id {bad} is out of the vocabulary (0..{vocab - 1})", "prompt")
            text = tok.decode(p.token_ids) if req.return_prompt else None
            return list(p.token_ids), text
        if isinstance(p, ChatPrompt):
            try:
                text = tok.apply_chat_template(
                    p.messages,
                    tokenize=False,
                    add_generation_prompt=p.add_generation_prompt and not p.continue_final_message,
                    continue_final_message=p.continue_final_message,
                    chat_template=self.chat_template,
                    **(p.chat_template_kwargs or {}),
                )
            except Exception as e:  # template errors are the request's fault (bad roles, ...)
                raise BadRequest(f"the chat template could not render these messages: {e}", "messages") from None
            ids = await self._tokenize(text, add_special_tokens=False)
            return ids, text
        assert isinstance(p, TextPrompt)
        return await self._tokenize(p.text, p.add_special_tokens), p.text

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        encode_ = self.tokenizer.encode
        if len(text) <= TOKENIZE_INLINE_MAX_CHARS:
            return encode_(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(encode_, text, add_special_tokens=add_special_tokens)
