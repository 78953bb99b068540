"""What an engine serves: its model (for generation or embedding) and the LoRA
adapters of it, static (`LORA_MODULES`) and loaded at run time. Requests name an
adapter as their model; vLLM applies it per request."""

from __future__ import annotations

import logging
from typing import Any

from vllm.lora.request import LoRARequest

from vllm_gateway.engine.failures import BadRequest
from vllm_gateway.protocol.messages import FailureKind, ModelInfo

log = logging.getLogger("engine.models")


class ServedModels:
    """The engine's model and its adapters, by the names clients use."""

    def __init__(self, name: str, root: str, task: str, max_model_len: int, lora_enabled: bool) -> None:
        self.name = name
        self.root = root
        self.task = task
        self.max_model_len = max_model_len
        self.lora_enabled = lora_enabled
        self.adapters: dict[str, LoRARequest] = {}
        self._next_id = 1

    def info(self) -> list[ModelInfo]:
        base = ModelInfo(self.name, self.task, None, self.root, self.max_model_len)
        return [base] + [ModelInfo(n, self.task, self.name, r.lora_path, self.max_model_len)
                         for n, r in self.adapters.items()]

    def lora(self, model: str) -> LoRARequest | None:
        """The adapter a request names (None for the base model)."""
        if not model or model == self.name:
            return None
        adapter = self.adapters.get(model)
        if adapter is None:
            raise BadRequest(f"The model `{model}` does not exist on this engine; it serves "
                             + ", ".join([self.name, *self.adapters]), "model", FailureKind.NOT_FOUND)
        return adapter

    async def load(self, llm: Any, name: str, path: str) -> str:
        if not self.lora_enabled:
            raise BadRequest("LoRA is not enabled on this engine (ENABLE_LORA=1)", "lora_name")
        if name == self.name or name in self.adapters:
            raise BadRequest(f"The LoRA adapter '{name}' has already been loaded.", "lora_name")
        request = LoRARequest(lora_name=name, lora_int_id=self._next_id, lora_path=path,
                              base_model_name=self.name)
        try:
            await llm.add_lora(request)
        except Exception as e:  # a path that is no adapter, or one of another rank / model
            raise BadRequest(f"could not load LoRA adapter '{name}' from {path}: {e}", "lora_path") from None
        self._next_id += 1
        self.adapters[name] = request
        log.info("LoRA adapter %s loaded from %s", name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, llm: Any, name: str) -> str:
        request = self.adapters.pop(name, None)
        if request is None:
            raise BadRequest(f"The LoRA adapter '{name}' cannot be found.", "lora_name", FailureKind.NOT_FOUND)
        await llm.remove_lora(request.lora_int_id)
        log.info("LoRA adapter %s unloaded", name)
        return f"Success: LoRA adapter '{name}' removed successfully."
