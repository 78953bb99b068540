"""Stored responses (`store: true`): what `previous_response_id`, `GET`, `DELETE`
and cancel read, and the events of background responses for a resumed stream.

One `ResponseStore` per serving process, over a backend chosen by
RESPONSES_STORE: an SQLite file (the default: a box keeps its conversations
across restarts), SQLite in memory (`memory`: this process only), or Redis
(every gateway pointed at it shares one store: a response made on one replica
is read, chained, cancelled and deleted on any other).

The bounds hold in every backend: at most `max_bytes` (a response's record and
its events counted), `max_count` responses, each kept `ttl_s` after it finished;
the oldest finished go first to make room. A queued or running background
response is never evicted: when only those are left, a new stored response is
refused (429) rather than growing the store past its bound. A backend that
fails (Redis gone) is a 503 in the API's shape, and the next call tries again."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import msgspec

from vllm_gateway.gateway.config import StoreSettings
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.responses.backend import Backend, StoreUnavailable
from vllm_gateway.gateway.responses.schemas import Response

log = logging.getLogger("gateway.responses")

# How long a gateway vouches for a background response it runs: it renews the
# lease every `LEASE_RENEW_S`; a lapsed lease means the gateway died, and the
# response is ended `failed` by whoever reads it next.
LEASE_S = 15.0
LEASE_RENEW_S = 0.25  # also how soon a cancel asked on another gateway is seen


class Record(msgspec.Struct):
    """What is kept of one response: enough to answer GET as the first answer
    was given and to continue the conversation."""

    response: Response
    # The conversation it answered (earlier turns and this input, as chat
    # messages, without instructions): what a chained request continues.
    conversation: list[dict[str, Any]]
    owner: str | None = None  # the API key's id that made it (never the key); None: no keys configured


_decode_record = msgspec.json.Decoder(Record).decode


@dataclasses.dataclass
class Stored:
    record: Record
    lease: float = 0.0  # running: the wall time its gateway vouches for it until
    cancel: bool = False  # running: a cancel was asked for, on any gateway

    @property
    def response(self) -> Response:
        return self.record.response

    @property
    def running(self) -> bool:
        return self.response.status in ("queued", "in_progress")


def _lease(response: Response) -> float | None:
    return time.time() + LEASE_S if response.status in ("queued", "in_progress") else None


def open_backend(settings: StoreSettings) -> Backend:
    if settings.kind == "redis":
        from vllm_gateway.gateway.responses.store_redis import RedisBackend

        return RedisBackend(settings)
    from vllm_gateway.gateway.responses.store_sqlite import SQLiteBackend

    return SQLiteBackend(settings)


def unavailable(e: StoreUnavailable) -> APIError:
    return APIError(503, f"the response store is unavailable ({e}); retry shortly", type="service_unavailable_error",
                    code="store_unavailable", headers={"Retry-After": "1"})


class ResponseStore:
    """Records in, records out, per API key: to any other key a response does
    not exist. Every backend failure is raised as a 503 `APIError`."""

    def __init__(self, settings: StoreSettings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or open_backend(settings)
        log.info("stored responses: %s (at most %d bytes, %d responses, kept %g s)", settings.describe(),
                 settings.max_bytes, settings.max_count, settings.ttl_s)

    async def _call(self, method, *args):
        try:
            return await method(*args)
        except StoreUnavailable as e:
            log.warning("response store: %s", e)
            raise unavailable(e) from None

    def check_size(self, response: Response, conversation: list[dict[str, Any]], owner: str | None) -> int:
        """The bytes of a response before it runs; over the per-response bound it
        is refused (400) before anything is stored."""
        size = len(json_encode(Record(response, conversation, owner)))
        limit = self.settings.max_item_bytes
        if size > limit:
            raise APIError(400, f"the conversation to store takes {size} bytes; a stored response may take at most "
                                f"{limit} (a quarter of RESPONSES_STORE_MAX_BYTES). Send it with store: false, or "
                                "start a new conversation", param="input", code="stored_response_too_large")
        return size

    async def create(self, response: Response, conversation: list[dict[str, Any]], owner: str | None) -> None:
        body = json_encode(Record(response, conversation, owner))
        if not await self._call(self.backend.create, response.id, body, _lease(response)):
            raise APIError(429, "the response store is full of running background responses "
                                "(RESPONSES_STORE_MAX_BYTES / RESPONSES_STORE_SIZE); retry when some have finished",
                           type="rate_limit_error", code="store_full", headers={"Retry-After": "1"})

    async def update(self, response: Response, conversation: list[dict[str, Any]], owner: str | None) -> bool:
        body = json_encode(Record(response, conversation, owner))
        return await self._call(self.backend.update, response.id, body, _lease(response))

    async def get(self, rid: str, owner: str | None = None) -> Stored | None:
        found = await self._call(self.backend.get, rid)
        if found is None:
            return None
        body, lease, cancel = found
        stored = Stored(_decode_record(body), lease, cancel)
        if stored.record.owner != owner:
            return None
        return stored

    async def delete(self, rid: str, owner: str | None = None) -> bool:
        if await self.get(rid, owner) is None:
            return False
        return await self._call(self.backend.delete, rid)

    async def append(self, rid: str, events: list[bytes]) -> None:
        await self._call(self.backend.append, rid, events)

    async def events(self, rid: str, after: int) -> list[bytes]:
        return await self._call(self.backend.events, rid, after)

    async def request_cancel(self, rid: str) -> None:
        await self._call(self.backend.request_cancel, rid)

    async def heartbeat(self, rids: list[str]) -> set[str]:
        return await self._call(self.backend.heartbeat, rids, time.time() + LEASE_S)

    async def usage(self) -> tuple[int, int]:
        return await self._call(self.backend.usage)

    async def close(self) -> None:
        await self.backend.close()
