"""Requests in: a `Generate` as vLLM's `AsyncLLM.generate` takes it (the prompt,
rendered, and vLLM's sampling parameters), checked against the model's context
(the input side, as vLLM's own `input_processor.py` is)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
from vllm import SamplingParams as VllmSamplingParams
from vllm.inputs import TokensPrompt as VllmTokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.sampling_params import StructuredOutputsParams as VllmStructuredOutputs

from vllm_gateway.engine.chat import ChatRenderer, RenderedChat
from vllm_gateway.engine.failures import BadRequest
from vllm_gateway.protocol.messages import (
    ChatPrompt,
    FailureKind,
    Generate,
    Prompt,
    SamplingParams,
    StructuredOutputs,
    TextPrompt,
    TokensPrompt,
)

# Prompts longer than this (in characters) are tokenized off the event loop.
TOKENIZE_INLINE_MAX_CHARS = 8192


@dataclasses.dataclass
class Rendered:
    prompt_ids: list[int]
    prompt_text: str | None  # only when the gateway asked for it (`return_prompt`), or already at hand
    params: VllmSamplingParams
    engine_input: Any  # what AsyncLLM.generate takes
    chat: RenderedChat | None = None  # a chat request, as vLLM's renderer left it


def structured_outputs(so: StructuredOutputs | None) -> VllmStructuredOutputs | None:
    if so is None:
        return None
    fields = msgspec.structs.asdict(so)
    del fields["origin"]
    return VllmStructuredOutputs(**fields)


def sampling_params(p: SamplingParams, max_tokens: int, so: VllmStructuredOutputs | None = None) -> VllmSamplingParams:
    """vLLM sampling parameters (our fields carry vLLM's names), streaming deltas.
    vLLM validates them again and raises on what it rejects."""
    fields = msgspec.structs.asdict(p)
    fields.update(max_tokens=max_tokens, stop=p.stop or None, stop_token_ids=p.stop_token_ids or None,
                  structured_outputs=so)
    return VllmSamplingParams(**fields, output_kind=RequestOutputKind.DELTA)


class InputRenderer:
    """Renders requests for one model: its tokenizer and context length; chat
    requests through vLLM's renderer (`chat.py`)."""

    def __init__(self, tokenizer: Any, max_model_len: int, chat: ChatRenderer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chat = chat

    async def render(self, req: Generate) -> Rendered:
        """Raises `BadRequest` for what the request got wrong (a prompt the chat
        template refuses, token ids out of the vocabulary, no room in the context)."""
        p = req.params
        if isinstance(req.prompt, ChatPrompt):
            so = msgspec.structs.asdict(p.structured_outputs) if p.structured_outputs is not None else None
            if so is not None:
                so = {k: v for k, v in so.items() if k != "origin" and v not in (None, False)}
            chat = await self.chat.render(req.prompt, so, p.n)
            ids = chat.prompt_ids
            params = sampling_params(p, self.max_tokens(len(ids), p.max_tokens), chat.request.extract_structured_outputs())
            return Rendered(ids, None, params, chat.engine_input, chat)
        ids, text = await self._prompt(req)
        params = sampling_params(p, self.max_tokens(len(ids), p.max_tokens), structured_outputs(p.structured_outputs))
        return Rendered(ids, text, params, VllmTokensPrompt(prompt_token_ids=ids))

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, as a generation would see them."""
        if isinstance(prompt, ChatPrompt):
            return (await self.chat.render(prompt, None, 1)).prompt_ids
        if isinstance(prompt, TokensPrompt):
            return list(prompt.token_ids)
        return await self._tokenize(prompt.text, prompt.add_special_tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        self._check_vocab(token_ids, "tokens")
        return self.tokenizer.decode(token_ids)

    def _check_vocab(self, token_ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = next((t for t in token_ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is out of the vocabulary (0..{vocab - 1})", param)

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
            self._check_vocab(p.token_ids, "prompt")
            text = tok.decode(p.token_ids) if req.return_prompt else None
            return list(p.token_ids), text
        assert isinstance(p, TextPrompt)
        return await self._tokenize(p.text, p.add_special_tokens), p.text

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        encode_ = self.tokenizer.encode
        if len(text) <= TOKENIZE_INLINE_MAX_CHARS:
            return encode_(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(encode_, text, add_special_tokens=add_special_tokens)
