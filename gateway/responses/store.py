"""Stored responses (`store: true`), for `previous_response_id`, `GET` and
`DELETE /v1/responses/{id}`, and background responses still running.

In memory, per gateway process: bounded in count (least recently used dropped
first) and in age. A response stored by one gateway is unknown to another
(behind a balancer, chain through the same gateway)."""

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
    task: asyncio.Task | None = None  # a background response still running


class ResponseStore:
    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def put(self, response: Response, conversation: list[dict[str, Any]], task: asyncio.Task | None = None) -> Stored:
        stored = Stored(response, conversation, time.monotonic() + self.ttl_s, task)
        self._items[response.id] = stored
        self._items.move_to_end(response.id)
        while len(self._items) > self.size:
            _, dropped = self._items.popitem(last=False)
            if dropped.task is not None:
                dropped.task.cancel()
        return stored

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is None:
            return None
        if time.monotonic() > stored.expires:
            self.delete(response_id)
            return None
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is not None and stored.task is not None:
            stored.task.cancel()
        return stored is not None

    def __len__(self) -> int:
        return len(self._items)
