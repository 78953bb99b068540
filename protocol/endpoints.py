"""Where engines listen: the one default both sides agree on."""

from __future__ import annotations

import os


def default_engine_endpoint(engine_id: str = "0") -> str:
    """An ipc:// socket private to this user (no TCP port, nothing on the network)."""
    run_dir = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"ipc://{run_dir}/vllm-gateway-{os.getuid()}-engine-{engine_id}"


def parse_endpoints(value: str | None) -> list[str]:
    """`ENGINE_ENDPOINTS`: comma-separated ZeroMQ endpoints."""
    if not value:
        return [default_engine_endpoint()]
    return [v.strip() for v in value.split(",") if v.strip()]
