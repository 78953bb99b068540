"""API errors: what went wrong (`APIError`: status, message, the field at fault)
apart from how a route shows it (`ErrorShape`: OpenAI's error object by
default, Anthropic's on its routes), and the one mapping of bad bodies and engine
failures to errors."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from vllm_gateway.gateway.core.schema import ErrorInfo, ErrorResponse, json_encode
from vllm_gateway.protocol.messages import FailureKind, RequestFailed

T = TypeVar("T")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error the client gets as an OpenAI error object with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers  # for HTTP answers (Retry-After)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> bytes:
        """As OpenAI's error object (the default shape)."""
        return json_encode(self.response())

    def response(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.code))

    def sse_event(self) -> bytes:
        return b"data: " + self.body() + b"\n\n"


@dataclasses.dataclass(frozen=True)
class ErrorShape:
    """How a route's errors look: the JSON body of an error answer, and its
    schema (for /openapi.json). Each operation names its shape."""

    name: str
    body: Callable[[APIError], bytes]
    schema: type


OPENAI_ERRORS = ErrorShape("openai", APIError.body, ErrorResponse)


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def from_validation(err: msgspec.ValidationError | msgspec.DecodeError, what: str = "request") -> APIError:
    """A 400 naming the offending field, from msgspec's message
    (`Expected int >= 1 - at $.n` -> param "n")."""
    text = str(err)
    if isinstance(err, msgspec.ValidationError):
        m = _PATH.search(text)
        param = m.group(1) if m else ""
        field = _FIELD.search(text)
        if field:
            param = f"{param}.{field.group(1)}" if param else field.group(1)
        return APIError(400, f"invalid {what}: {text}", param=param or None)
    return APIError(400, f"malformed JSON body: {text}")


def decode_or_400(decode: Callable[[Any], T], data: Any, what: str = "request") -> T:
    """`decode(data)`, with every way a body can be wrong as a 400: a wrong type or
    value (naming the field), malformed JSON, invalid UTF-8, nesting deeper than
    the decoder's recursion limit."""
    try:
        return decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise from_validation(e, what) from None
    except UnicodeDecodeError:
        raise APIError(400, "malformed JSON body: invalid UTF-8") from None
    except RecursionError:
        raise APIError(400, f"invalid {what}: nested too deeply") from None


# An engine's failure kind -> (HTTP status, OpenAI error type, code): the one place it is decided.
_FAILURES = {
    FailureKind.BAD_REQUEST: (400, "invalid_request_error", None),
    FailureKind.CONTEXT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
    FailureKind.ENGINE_UNAVAILABLE: (503, "engine_unavailable", None),
    FailureKind.OVERLOADED: (503, "service_unavailable_error", "overloaded"),
    FailureKind.INTERNAL: (500, "server_error", None),
    FailureKind.NOT_FOUND: (404, "not_found_error", "model_not_found"),
}


def from_failure(failure: RequestFailed, prompt_param: str = "prompt") -> APIError:
    """The client's error for an engine request's failure. A prompt fault names
    the field the prompt came in (`messages` for chat)."""
    status, type_, code = _FAILURES.get(failure.kind, _FAILURES[FailureKind.INTERNAL])
    param = prompt_param if failure.param in ("prompt", "messages") else failure.param
    return APIError(status, failure.message, param=param, code=code, type=type_)
