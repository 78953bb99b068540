"""Gateway settings, from the environment (flags of `vllm-gateway http` override)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from protocol.endpoints import parse_endpoints


@dataclasses.dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    engine_endpoints: list[str] = dataclasses.field(default_factory=lambda: parse_endpoints(None))
    response_role: str = "assistant"
    max_body_bytes: int = 16 * 1024 * 1024
    drain_timeout_s: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "GatewaySettings":
        return cls(
            host=env.get("HOST", cls.host),
            port=int(env.get("PORT", cls.port)),
            engine_endpoints=parse_endpoints(env.get("ENGINE_ENDPOINTS")),
            response_role=env.get("OPENAI_RESPONSE_ROLE") or cls.response_role,
            max_body_bytes=int(env.get("MAX_REQUEST_BODY_BYTES", cls.max_body_bytes)),
            drain_timeout_s=int(env.get("DRAIN_TIMEOUT_S", cls.drain_timeout_s)),
        )
