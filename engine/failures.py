"""What went wrong with a request, as the engine tells its gateway: a failure
kind and the request field at fault (the gateway maps kinds to HTTP)."""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError

from vllm_gateway.protocol.messages import FailureKind

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
