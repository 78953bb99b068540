"""What went wrong with a request, as the engine tells its gateway: a failure
kind and the request field at fault (the gateway maps kinds to HTTP)."""

from __future__ import annotations

import logging

from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from vllm_gateway.protocol.messages import FailureKind, RequestFailed

log = logging.getLogger("engine.failures")

# vLLM's parameters that mean "the prompt does not fit the context".
_CONTEXT_PARAMS = {"input_tokens", "input_text", "max_model_len", "max_total_tokens"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, kind: FailureKind = FailureKind.BAD_REQUEST) -> None:
        super().__init__(message)
        self.param = param
        self.kind = kind


def from_vllm_error(e: BaseException, param: str | None = None) -> BadRequest:
    """A vLLM validation error (or the ValueError of a template or a media part)
    as our `BadRequest`, keeping vLLM's message and naming the field."""
    if isinstance(e, VLLMValidationError):
        if e.parameter in _CONTEXT_PARAMS:
            return BadRequest(e.args[0], param, FailureKind.CONTEXT_TOO_LONG)
        return BadRequest(e.args[0], e.parameter or param)
    return BadRequest(str(e) or type(e).__name__, param)


def to_failure(rid: str, e: BaseException) -> RequestFailed:
    """A request's exception as the gateway's `RequestFailed`: the one place an
    engine decides what kind of failure it was."""
    if isinstance(e, BadRequest):
        return RequestFailed(rid, e.kind, str(e), param=e.param)
    if isinstance(e, EngineDeadError):
        return RequestFailed(rid, FailureKind.ENGINE_UNAVAILABLE, "the engine died; retry the request")
    if isinstance(e, (VLLMClientError, ValueError, TypeError)):  # vLLM's own validation
        return RequestFailed(rid, FailureKind.BAD_REQUEST, str(e), param=getattr(e, "parameter", None))
    if isinstance(e, GracefulHTTPError):  # e.g. vLLM's admission control
        status = int(e.http_status)
        kind = (FailureKind.OVERLOADED if status in (429, 503) else
                FailureKind.BAD_REQUEST if status < 500 else FailureKind.INTERNAL)
        return RequestFailed(rid, kind, e.message)
    log.error("request %s failed", rid, exc_info=e)
    cause = e.__cause__ if e.__cause__ is not None else e
    return RequestFailed(rid, FailureKind.INTERNAL, f"internal engine error: {type(cause).__name__}: {cause}")
