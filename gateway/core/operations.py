"""One table of operations: every route the gateway serves, whichever intake a
request comes by.

An `Operation` carries its method and path, the request body's type, its
handler, the shape of its errors and its documentation; the HTTP app builds its
routes from the table, `/openapi.json` is generated from it, and RunPod's job
router finds a job's route in it (`openai_route`, or worker-vllm's generic
`{route, method, body}`). A handler is neutral: given the `Context` and the
decoded request it returns a `Call` to run, a `Result`, or an object answered as
JSON; each intake turns that into its own wire.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from vllm_gateway.gateway.config import ServingSettings
from vllm_gateway.gateway.core.admission import Admission
from vllm_gateway.gateway.core.errors import OPENAI_ERRORS, ErrorShape
from vllm_gateway.gateway.engines.client import EngineClient

JSON = "application/json"


@dataclasses.dataclass
class Context:
    """What every handler is given besides its request. One per serving
    process (the HTTP app, the RunPod worker)."""

    client: EngineClient
    settings: ServingSettings
    operations: "Operations"
    draining: bool = False  # stopping: new work is refused, what runs may finish
    admission: Admission = dataclasses.field(default_factory=Admission)  # requests reaching an engine now
    # State an intake keeps per process, each entry owned by the package that
    # made it (the stored responses, say): `state.setdefault`-style, by name.
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Run when the process stops, before the engines are let go (accepted work
    # that is still running ends visibly, not silently).
    closing: list[Callable[[], Awaitable[Any]]] = dataclasses.field(default_factory=list)

    async def close(self) -> None:
        for hook in self.closing:
            await hook()
        await self.client.close()


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A request as every intake hands it to a handler."""

    body: Any  # the decoded body (the operation's `body` type), or None
    params: dict[str, str] = dataclasses.field(default_factory=dict)  # path parameters
    owner: str | None = None  # who asks: the id of the API key used (None without keys)
    query: dict[str, str] = dataclasses.field(default_factory=dict)  # query parameters


@dataclasses.dataclass(frozen=True)
class Result:
    """An answer other than a 200 JSON object: another status or media type.
    `body` is bytes as they are, or an object encoded as JSON."""

    body: Any
    status: int = 200
    media_type: str = JSON


Handler = Callable[[Context, Incoming], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str  # lower case, as OpenAPI writes it
    path: str  # with {parameters}
    summary: str
    handler: Handler
    body: type | None = None  # the request body's type
    answer: type | None = None  # the 200 answer (JSON)
    chunk: type | None = None  # the streamed event's type, when `stream: true` is possible
    errors: tuple[int, ...] = ()
    other: str | None = None  # a 200 answer that is not a JSON object: its media type
    errors_as: ErrorShape = OPENAI_ERRORS
    answered_as_ok: tuple[int, ...] = ()  # error statuses whose body is the answer's type (/health's 503)
    work: bool = False  # needs an engine: refused while draining
    jobs: bool = True  # reachable from a RunPod job
    query: tuple[tuple[str, dict[str, Any]], ...] = ()  # query parameters: (name, JSON schema)


class Operations:
    """The table, with lookups by method and path."""

    def __init__(self, operations: Iterable[Operation]) -> None:
        self._ops = tuple(operations)
        seen: set[tuple[str, str]] = set()
        for op in self._ops:
            key = (op.method, op.path)
            if key in seen:
                raise ValueError(f"operation {op.method.upper()} {op.path} is defined twice")
            seen.add(key)
        self._literal: dict[str, list[Operation]] = {}
        for op in self._ops:
            if "{" not in op.path:
                self._literal.setdefault(op.path, []).append(op)
        self._patterns = [(re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", op.path) + "$"), op)
                          for op in self._ops if "{" in op.path]
        self.paths = tuple(dict.fromkeys(op.path for op in self._ops))

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._ops)

    def at(self, path: str) -> list[tuple[Operation, dict[str, str]]]:
        """The operations of a path (any method), with its parameters."""
        literal = self._literal.get(path)
        if literal is not None:
            return [(op, {}) for op in literal]
        out = []
        for pattern, op in self._patterns:
            m = pattern.match(path)
            if m is not None:
                out.append((op, m.groupdict()))
        return out

    def find(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        method = method.lower()
        return next(((op, params) for op, params in self.at(path) if op.method == method), None)

    def errors_for(self, path: str) -> ErrorShape:
        """The error shape of a path's routes (OpenAI's for paths not served)."""
        found = self.at(path)
        return found[0][0].errors_as if found else OPENAI_ERRORS

    def route_label(self, path: str) -> str:
        """The documented path a request's path is (its template), for metrics."""
        found = self.at(path)
        return found[0][0].path if found else "other"
