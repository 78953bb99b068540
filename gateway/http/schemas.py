"""The bodies of the server's own routes: health and version."""

from __future__ import annotations

from msgspec import Struct

from vllm_gateway.gateway.engines.client import EngineSummary


class Version(Struct):
    version: str  # the engines' vLLM, as `vllm serve` answers
    vllm_gateway: str



class Health(Struct):
    status: str  # ok, unavailable, or draining
    engines: list[EngineSummary]
