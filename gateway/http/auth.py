"""API keys for the HTTP gateway: ASGI middleware that lets a request through
only with one of the configured keys, as `Authorization: Bearer <key>` (OpenAI's
clients) or `x-api-key: <key>` (Anthropic's). Keys are compared in constant time
and never logged. Health, readiness and metrics stay open unless configured."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable

from vllm_gateway.gateway import metrics
from vllm_gateway.gateway.core.errors import OPENAI_ERRORS, APIError, ErrorShape

# Where a request's key is named for what it owns (stored responses): a digest of
# the key, never the key itself.
KEY_ID = "vllm_gateway.key_id"


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


class ApiKeyAuth:
    def __init__(self, app, keys: Iterable[str], open_paths: Iterable[str] = (),
                 errors_for: Callable[[str], ErrorShape] = lambda path: OPENAI_ERRORS) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = frozenset(open_paths)
        self.errors_for = errors_for  # a path's error shape (the table's)

    def _allowed(self, given: bytes) -> bool:
        # Every key is compared, whichever matches: the time taken says nothing of which.
        return any([hmac.compare_digest(given, key) for key in self.keys])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and given is None:
                given = value.strip()
        if given is not None and self._allowed(given):
            scope[KEY_ID] = key_id(given)
            return await self.app(scope, receive, send)
        error = APIError(401, "Invalid API key" if given is not None else
                         "Missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)",
                         type="authentication_error", code="invalid_api_key")
        metrics.ERRORS.labels(error.type).inc()
        body = self.errors_for(scope["path"]).body(error)
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
