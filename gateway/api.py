"""Every operation this gateway serves: the server's own and each intake's
rows, joined into the one table that the HTTP app, /openapi.json and RunPod's
job router read."""

from __future__ import annotations

from vllm_gateway.gateway.anthropic import routes as anthropic
from vllm_gateway.gateway.core.operations import Operations
from vllm_gateway.gateway.http import routes as server
from vllm_gateway.gateway.openai import routes as openai
from vllm_gateway.gateway.responses import routes as responses


def operations() -> Operations:
    return Operations([*openai.OPERATIONS, *responses.OPERATIONS, *anthropic.OPERATIONS, *server.OPERATIONS])
