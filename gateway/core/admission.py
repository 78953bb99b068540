"""Admission: how many requests that reach an engine this process serves at
once. Beyond `cap` a new one is refused at once (429 and Retry-After over
HTTP), so that a load balancer or a router sends it elsewhere instead of a
queue growing until every request times out."""

from __future__ import annotations


class Admission:
    __slots__ = ("cap", "in_flight")

    def __init__(self, cap: int = 0) -> None:
        self.cap = cap  # 0: no cap
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.cap and self.in_flight >= self.cap:
            return False
        self.in_flight += 1
        return True

    def enter(self) -> None:
        """Count work already accepted (a background response), cap or not."""
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
