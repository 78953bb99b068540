"""What a store of responses keeps them in: bytes by response id, with the
bounds applied where the data lives. `store.py` is the typed side over it;
`store_sqlite.py` and `store_redis.py` are the two kinds."""

from __future__ import annotations

import abc

from vllm_gateway.gateway.config import StoreSettings


class StoreUnavailable(Exception):
    """The backend cannot be reached or written (its message says why)."""


class Backend(abc.ABC):
    """Bytes by response id, with the bounds applied where the data lives (in one
    SQLite transaction, in one Redis script), so gateways sharing it agree."""

    def __init__(self, limits: StoreSettings) -> None:
        self.limits = limits

    @abc.abstractmethod
    async def create(self, rid: str, body: bytes, lease: float | None) -> bool:
        """Store a new response (`lease`: running, vouched for until then; None:
        finished), evicting the oldest finished ones to make room; False when
        only running ones are left and it does not fit."""

    @abc.abstractmethod
    async def update(self, rid: str, body: bytes, lease: float | None) -> bool:
        """Replace a stored response (it always fits: finished ones make room);
        False when it is gone (deleted meanwhile)."""

    @abc.abstractmethod
    async def get(self, rid: str) -> tuple[bytes, float, bool] | None:
        """(body, lease, cancel asked) of a live response."""

    @abc.abstractmethod
    async def delete(self, rid: str) -> bool: ...

    @abc.abstractmethod
    async def append(self, rid: str, events: list[bytes]) -> None:
        """Add stream events (numbered on from those stored) to a response."""

    @abc.abstractmethod
    async def events(self, rid: str, after: int) -> list[bytes]:
        """The stored events numbered above `after`."""

    @abc.abstractmethod
    async def request_cancel(self, rid: str) -> None: ...

    @abc.abstractmethod
    async def heartbeat(self, rids: list[str], lease_until: float) -> set[str]:
        """Renew the leases of the running responses `rids`; those to stop (a
        cancel asked, or deleted) come back."""

    @abc.abstractmethod
    async def usage(self) -> tuple[int, int]:
        """(bytes, responses) held now."""

    async def close(self) -> None:
        pass
