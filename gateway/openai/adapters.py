"""LoRA adapters loaded and unloaded at run time (`POST /v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, as `vllm serve` names them): on every ready engine of
the base model, all or none, and only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is
set, as vLLM gates them (the engines enforce it too). The engine client keeps
them, and loads them again on an engine that restarts."""

from __future__ import annotations

from vllm_gateway.gateway.core.calls import no_engine, target
from vllm_gateway.gateway.core.errors import APIError, from_failure
from vllm_gateway.gateway.engines.client import EngineClient, NoEngine
from vllm_gateway.gateway.engines.streams import StreamFailed
from vllm_gateway.gateway.openai.schemas import LoadLoraRequest, UnloadLoraRequest


def _disabled() -> APIError:
    return APIError(404, "loading LoRA adapters at run time is off: set VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 "
                         "(and ENABLE_LORA=1 on the engines)", code="not_enabled")


async def load(client: EngineClient, req: LoadLoraRequest, allowed: bool) -> str:
    if not allowed:
        raise _disabled()
    base = target(client, req.base_model_name).model
    try:
        return await client.load_adapter(req.lora_name, req.lora_path, base)
    except NoEngine:
        raise no_engine() from None
    except StreamFailed as e:
        raise from_failure(e.failure, "lora_path") from None


async def unload(client: EngineClient, req: UnloadLoraRequest, allowed: bool) -> str:
    if not allowed:
        raise _disabled()
    served = {m.name: m for m in client.served_models()}
    adapter = served.get(req.lora_name)
    if adapter is None or adapter.parent is None:
        raise APIError(404, f"The LoRA adapter '{req.lora_name}' cannot be found.", param="lora_name",
                       code="model_not_found")
    try:
        return await client.unload_adapter(req.lora_name)
    except NoEngine:
        raise no_engine() from None
    except StreamFailed as e:
        raise from_failure(e.failure, "lora_name") from None
