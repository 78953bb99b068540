"""RunPod job inputs and outputs, as RunPod's worker-vllm defined them.

A job's `input` is OpenAI mode (`openai_route` + `openai_input`, what the
`https://api.runpod.ai/v2/<id>/openai/v1/...` URLs turn requests into), any route
of the table by worker-vllm's generic `{"route", "method", "body"}`, or standard
mode (`prompt` or `messages`, `sampling_params`, streaming and batch sizes).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from vllm_gateway.gateway.core.requests import ChatMessages, Sampling
from vllm_gateway.gateway.core.schema import PositiveInt

GrowthFactor = Annotated[float, Meta(ge=1.0)]


class JobSamplingParams(Sampling, kw_only=True, forbid_unknown_fields=True):
    """Standard mode's `sampling_params`: vLLM's names. Unknown keys are refused
    (vLLM's own `SamplingParams(**params)` refused them in worker-vllm too)."""


class JobInput(Struct, kw_only=True):
    # OpenAI mode
    openai_route: str | None = None
    openai_input: dict[str, Any] | None = None
    # Any route the gateway serves (worker-vllm's generic input)
    route: str | None = None
    method: str = "POST"
    body: dict[str, Any] | None = None
    # Standard mode
    input: str | list[Any] | None = None  # embeddings, as worker-vllm takes them
    model: str | None = None
    prompt: str | None = None
    messages: ChatMessages | None = None
    apply_chat_template: bool = False
    sampling_params: JobSamplingParams | None = None
    stream: bool = False
    # Stream batching: sizes grow min, min*g, min*g^2, ... up to max (in tokens for
    # standard mode, in SSE events for OpenAI mode).
    max_batch_size: PositiveInt | None = None
    min_batch_size: PositiveInt | None = None
    batch_size_growth_factor: GrowthFactor | None = None


class JobUsage(Struct):
    input: int
    output: int


class JobChoice(Struct):
    tokens: list[str]


class JobOutput(Struct):
    """One yield of a standard-mode job."""

    choices: list[JobChoice]
    usage: JobUsage


def job_input_from_dict(obj: Any) -> JobInput:
    return msgspec.convert(obj, JobInput)


to_builtins = msgspec.to_builtins
"""OpenAI and job objects -> plain dicts and lists, which the RunPod SDK posts as JSON."""
