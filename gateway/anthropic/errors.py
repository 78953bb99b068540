"""Errors in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`,
with Anthropic's error types for each HTTP status."""

from __future__ import annotations

from vllm_gateway.gateway.anthropic.schemas import ErrorBody, ErrorDetail
from vllm_gateway.gateway.core.errors import APIError, ErrorShape
from vllm_gateway.gateway.core.schema import json_encode

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 415: "invalid_request_error",
          429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def body(e: APIError) -> ErrorBody:
    """The error, with the field at fault named in the message (Anthropic's
    errors have no field of their own for it)."""
    message = e.message if e.param is None or e.param in e.message else f"{e.param}: {e.message}"
    return ErrorBody(ErrorDetail(_TYPES.get(e.status, "api_error"), message))


def sse_error(e: APIError) -> bytes:
    return b"event: error\ndata: " + json_encode(body(e)) + b"\n\n"


ANTHROPIC_ERRORS = ErrorShape("anthropic", lambda e: json_encode(body(e)), ErrorBody)
