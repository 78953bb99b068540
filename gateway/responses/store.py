"""Stored responses (`store: true`), for `previous_response_id`, `GET` and
`DELETE /v1/responses/{id}`, and background responses still running.

In memory, per gateway process: bounded in count (least recently used dropped
first) and in age, but a queued or running background response is never
dropped: only finished ones are. Each response belongs to the API key that made
it (its `owner`); to any other key it does not exist. A response stored by one
gateway is unknown to another (behind a balancer, chain through the same
gateway)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any

from vllm_gateway.gateway.responses.schemas import Response


@dataclasses.dataclass
class Stored:
    response: Response
    # The conversation the response answered (earlier turns and this input, as
    # chat messages, without instructions): what a chained request continues.
    conversation: list[dict[str, Any]]
    expires: float
    owner: str | None = None  # the API key's id that made it (None: no keys configured)
    task: asyncio.Task | None = None  # a background response still running
    interrupted: str | None = None  # why the gateway stopped it (it then ends failed, not cancelled)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class ResponseStore:
    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def put(self, response: Response, conversation: list[dict[str, Any]], owner: str | None = None,
            task: asyncio.Task | None = None) -> Stored:
        previous = self._items.get(response.id)
        if previous is not None and task is None:
            task = previous.task if previous.running else None
        stored = Stored(response, conversation, time.monotonic() + self.ttl_s, owner, task)
        self._items[response.id] = stored
        self._items.move_to_end(response.id)
        self._evict()
        return stored

    def _evict(self) -> None:
        """Over the size: drop the least recently used finished responses."""
        over = len(self._items) - self.size
        if over <= 0:
            return
        for rid in [rid for rid, s in self._items.items() if not s.running][:over]:
            del self._items[rid]

    def get(self, response_id: str, owner: str | None = None) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            return None
        if time.monotonic() > stored.expires and not stored.running:
            del self._items[response_id]
            return None
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, owner: str | None = None) -> bool:
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            return False
        del self._items[response_id]
        if stored.task is not None:
            stored.task.cancel()
        return True

    def running(self) -> list[Stored]:
        return [s for s in self._items.values() if s.running]

    def __len__(self) -> int:
        return len(self._items)
