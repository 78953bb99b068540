"""Where engines listen: the one default both sides agree on."""

from __future__ import annotations

import os


def default_engine_endpoint(engine_id: str = "0") -> str:
    """An ipc:// socket private to this user (no TCP port, nothing on the network)."""
    run_dir = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"ipc://{run_dir}/vllm-gateway-{os.getuid()}-engine-{engine_id}"


def make_ipc_folder(endpoint: str) -> None:
    """The folder of an ipc:// socket, made (private to this user) if missing, so
    that a supervisor's config names `ipc:///run/vllm-gateway/engine-0` and
    nobody has to make `/run/vllm-gateway` first."""
    folder = os.path.dirname(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else ""
    if folder:
        os.makedirs(folder, mode=0o700, exist_ok=True)


def parse_endpoints(value: str | None) -> list[str]:
    """`ENGINE_ENDPOINTS`: comma-separated ZeroMQ endpoints."""
    if not value:
        return [default_engine_endpoint()]
    return [v.strip() for v in value.split(",") if v.strip()]
