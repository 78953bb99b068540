"""Embeddings with vLLM's pooling runner: each input through `AsyncLLM.encode`
with the model's pooler (its pooling, normalization and Matryoshka dimensions)."""

from __future__ import annotations

import asyncio
from typing import Any

from vllm import PoolingParams
from vllm.inputs import TokensPrompt as VllmTokensPrompt

from vllm_gateway.engine.failures import BadRequest
from vllm_gateway.engine.inputs import InputRenderer
from vllm_gateway.protocol.messages import Embed, Embeddings, FailureKind


async def embed(llm: Any, inputs: InputRenderer, msg: Embed, lora: Any = None) -> Embeddings:
    params = PoolingParams(task="embed", dimensions=msg.dimensions, use_activation=msg.normalize)
    prompts: list[list[int]] = []
    for i, p in enumerate(msg.inputs):
        ids = await inputs.tokenize(p)
        if msg.truncate_prompt_tokens is not None and len(ids) > msg.truncate_prompt_tokens:
            ids = ids[-msg.truncate_prompt_tokens:]
        if not ids:
            raise BadRequest(f"input[{i}] is empty", "input")
        if len(ids) > inputs.max_model_len:
            raise BadRequest(f"This model's maximum context length is {inputs.max_model_len} tokens. However, "
                             f"input[{i}] has {len(ids)} tokens. Please reduce the length of the input.",
                             "input", FailureKind.CONTEXT_TOO_LONG)
        prompts.append(ids)

    async def one(i: int, ids: list[int]) -> list[float]:
        final = None
        async for out in llm.encode(VllmTokensPrompt(prompt_token_ids=ids), params, f"{msg.request_id}-{i}",
                                    lora_request=lora):
            final = out
        assert final is not None
        return final.outputs.data.tolist()

    vectors = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    return Embeddings(msg.request_id, list(vectors), [len(ids) for ids in prompts])
