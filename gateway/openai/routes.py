"""OpenAI's operations (and vLLM's token and adapter routes): handlers and their
rows in the table."""

from __future__ import annotations

from vllm_gateway.gateway.core.calls import Call, target
from vllm_gateway.gateway.core.operations import Context, Incoming, Operation, Result
from vllm_gateway.gateway.core.requests import ChatCompletionRequest
from vllm_gateway.gateway.openai import adapters, serving
from vllm_gateway.gateway.openai.embeddings import embeddings
from vllm_gateway.gateway.openai.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    LoadLoraRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraRequest,
)

TEXT = "text/plain"
# What a request that reaches an engine can be answered with besides 200.
WORK_ERRORS = (400, 404, 408, 413, 415, 503)


async def chat_completions(ctx: Context, r: Incoming) -> Call:
    engine = target(ctx.client, r.body.model)
    return serving.prepare_chat(r.body, engine.model, ctx.settings.response_role)


async def completions(ctx: Context, r: Incoming) -> Call:
    engine = target(ctx.client, r.body.model)
    return serving.prepare_completion(r.body, engine.model, engine.max_model_len)


async def models(ctx: Context, r: Incoming) -> ModelList:
    return serving.model_list(ctx.client)


async def create_embeddings(ctx: Context, r: Incoming) -> EmbeddingResponse:
    return await embeddings(ctx.client, r.body, target(ctx.client, r.body.model, "embed"))


async def tokenize(ctx: Context, r: Incoming) -> TokenizeResponse:
    return await serving.tokenize(ctx.client, r.body, target(ctx.client, r.body.model, None))


async def detokenize(ctx: Context, r: Incoming) -> DetokenizeResponse:
    return await serving.detokenize(ctx.client, r.body, target(ctx.client, r.body.model, None))


async def load_lora(ctx: Context, r: Incoming) -> Result:
    return Result(await adapters.load(ctx.client, r.body, ctx.settings.allow_runtime_lora), media_type=TEXT)


async def unload_lora(ctx: Context, r: Incoming) -> Result:
    return Result(await adapters.unload(ctx.client, r.body, ctx.settings.allow_runtime_lora), media_type=TEXT)


OPERATIONS = (
    Operation("post", "/v1/chat/completions", "Create a chat completion (streamed as server-sent events with "
              "`stream: true`)", chat_completions, ChatCompletionRequest, ChatCompletion, ChatCompletionChunk,
              (*WORK_ERRORS, 504), work=True),
    Operation("post", "/v1/completions", "Create a text completion (streamed as server-sent events with "
              "`stream: true`)", completions, CompletionRequest, Completion, Completion, (*WORK_ERRORS, 504),
              work=True),
    Operation("get", "/v1/models", "The models served: base models, their LoRA adapters (with `parent`), "
              "embedding models", models, answer=ModelList, errors=(503,), work=True),
    Operation("post", "/v1/embeddings", "Create embeddings (an embedding model's engine)", create_embeddings,
              EmbeddingRequest, EmbeddingResponse, errors=WORK_ERRORS, work=True),
    Operation("post", "/v1/load_lora_adapter", "Load a LoRA adapter on every engine of its base model "
              "(VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)", load_lora, LoadLoraRequest, other=TEXT,
              errors=WORK_ERRORS, work=True, jobs=False),
    Operation("post", "/v1/unload_lora_adapter", "Unload a LoRA adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)",
              unload_lora, UnloadLoraRequest, other=TEXT, errors=WORK_ERRORS, work=True, jobs=False),
    Operation("post", "/tokenize", "Tokenize a `prompt`, or `messages` as a chat request renders them (vLLM's "
              "route)", tokenize, TokenizeRequest, TokenizeResponse, errors=WORK_ERRORS, work=True),
    Operation("post", "/detokenize", "Token ids back to text (vLLM's route)", detokenize, DetokenizeRequest,
              DetokenizeResponse, errors=WORK_ERRORS, work=True),
)
