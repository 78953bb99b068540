"""What an engine serves: its model (for generation or embedding) and the LoRA
adapters of it, static (`LORA_MODULES`) and loaded at run time. Requests name an
adapter as their model; vLLM applies it per request."""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.lora.request import LoRARequest

from vllm_gateway.engine.failures import BadRequest
from vllm_gateway.protocol.messages import FailureKind, ModelInfo

log = logging.getLogger("engine.models")


class ServedModels:
    """The engine's model and its adapters, by the names clients use."""

    def __init__(self, name: str, root: str, task: str, max_model_len: int, lora_enabled: bool,
                 runtime_updates: bool = False, lora_root: str | None = None) -> None:
        self.name = name
        self.root = root
        self.task = task
        self.max_model_len = max_model_len
        self.lora_enabled = lora_enabled
        # Whoever reaches this engine's socket is held to these, not only the gateway's clients.
        self.runtime_updates = runtime_updates
        self.lora_root = os.path.realpath(lora_root) if lora_root else None
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

    def _runtime_allowed(self) -> None:
        if not self.runtime_updates:
            raise BadRequest("loading LoRA adapters at run time is off on this engine: set "
                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1", "lora_name", FailureKind.NOT_FOUND)

    def _inside_root(self, path: str) -> None:
        """With LORA_ROOT, only paths inside it (links resolved); the refusal is the
        same whether an outside path exists or not."""
        if self.lora_root is None:
            return
        real = os.path.realpath(os.path.join(self.lora_root, path))
        if os.path.commonpath([real, self.lora_root]) != self.lora_root:
            raise BadRequest("lora_path must be inside LORA_ROOT", "lora_path")

    async def load(self, llm: Any, name: str, path: str, at_start: bool = False) -> str:
        if not at_start:
            self._runtime_allowed()
            self._inside_root(path)
            if self.lora_root is not None:
                path = os.path.realpath(os.path.join(self.lora_root, path))
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
        self._runtime_allowed()
        request = self.adapters.pop(name, None)
        if request is None:
            raise BadRequest(f"The LoRA adapter '{name}' cannot be found.", "lora_name", FailureKind.NOT_FOUND)
        await llm.remove_lora(request.lora_int_id)
        log.info("LoRA adapter %s unloaded", name)
        return f"Success: LoRA adapter '{name}' removed successfully."
