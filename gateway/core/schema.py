"""What every API schema shares: bounded scalar types (what the wire, msgpack
with 64-bit integers, can carry, and what an engine can serve without stalling),
the JSON encoder, decoders per type, and OpenAI's error object, the default
error shape. Struct modules hold no logic."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# ------------------------------------------------------------------ shared pieces

NonNegFloat = Annotated[float, Meta(ge=0.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**63 - 1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
ChoiceCount = Annotated[int, Meta(ge=1, le=128)]
# Token ids and token counts: what the wire carries (int64), and no model has more.
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
TokenCount = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
# Limits on list sizes (OpenAI allows 4 stop strings; vLLM sets none).
MAX_STOP = 256
MAX_STOP_TOKEN_IDS = 4096
MAX_LOGIT_BIAS = 2048
MAX_MESSAGES = 4096

# vLLM's sampling fields, typed once: chat, completions, RunPod and Responses take them.
TopK = Annotated[int, Meta(ge=-1)]  # -1 (or 0): no top-k
RepetitionPenalty = Annotated[float, Meta(gt=0.0)]
StopStrings = Annotated[list[str], Meta(max_length=MAX_STOP)]
StopTokenIds = Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)]
LogitBias = Annotated[dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=MAX_LOGIT_BIAS)]


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(Struct):
    error: ErrorInfo


json_encode = msgspec.json.Encoder().encode


@functools.cache
def json_decoder(type_: Any) -> Callable[[bytes], Any]:
    """The decoder of a request body into `type_` (one per type, kept)."""
    return msgspec.json.Decoder(type_).decode


def from_dict(type_: Any) -> Callable[[Any], Any]:
    """A checker for inputs that arrive already parsed (RunPod jobs): builtins in,
    `type_` out, with the same checks as the HTTP decoders."""
    return lambda obj: msgspec.convert(obj, type_)
