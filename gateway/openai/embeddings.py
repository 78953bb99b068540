"""`POST /v1/embeddings`: inputs to an embedding engine (vLLM's pooling runner),
vectors back as floats or base64, as OpenAI encodes them."""

from __future__ import annotations

import base64
import struct
import uuid

from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.core.generate import check_model
from vllm_gateway.gateway.openai import validation
from vllm_gateway.gateway.core.calls import Target, ask
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.openai.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from vllm_gateway.protocol.messages import Embed, Embeddings, TextPrompt, TokensPrompt


EMBED_TIMEOUT_S = 600.0


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def embeddings(client: EngineClient, req: EmbeddingRequest, engine: Target) -> EmbeddingResponse:
    check_model(req.model, engine.model)
    if req.encoding_format not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be float or base64, not {req.encoding_format!r}",
                       param="encoding_format")
    try:
        inputs = validation.completion_prompts(req.input, True)
    except APIError as e:
        raise APIError(e.status, e.message.replace("prompt", "input"), param="input") from None
    prompts: list[TextPrompt | TokensPrompt] = [p for p in inputs if isinstance(p, (TextPrompt, TokensPrompt))]
    msg = Embed(f"embd-{uuid.uuid4().hex}", prompts, req.dimensions, req.normalize, req.truncate_prompt_tokens)
    # A large batch on a CPU takes a while; the client's disconnect still ends it early.
    answer: Embeddings = await ask(client, msg, "input", engine.model, timeout_s=EMBED_TIMEOUT_S)
    encode = _base64 if req.encoding_format == "base64" else (lambda v: v)
    data = [Embedding(i, encode(v)) for i, v in enumerate(answer.vectors)]
    used = sum(answer.num_prompt_tokens)
    return EmbeddingResponse(data, engine.model, EmbeddingUsage(used, used))
