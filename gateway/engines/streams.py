"""What a client request receives from its engine: a stream of deltas merged per
choice (or one answer), and how pieces of one choice join."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Union

from vllm_gateway.protocol.messages import (
    Delta,
    Detokenize,
    Embed,
    FailureKind,
    LoadAdapter,
    RequestFailed,
    Tokenize,
    TokenLogprob,
    ToolCallDelta,
    UnloadAdapter,
)


def merge(deltas: list[Delta]) -> list[Delta]:
    """One delta per (request, choice), in order of first appearance."""
    if len(deltas) < 2:
        return deltas
    groups: dict[tuple[str, int], list[Delta]] = {}
    for d in deltas:
        key = (d.request_id, d.index)
        group = groups.get(key)
        if group is None:
            groups[key] = [d]
        else:
            group.append(d)
    if len(groups) == len(deltas):
        return deltas
    return [g[0] if len(g) == 1 else _joined(g) for g in groups.values()]


def _joined(group: list[Delta]) -> Delta:
    """Consecutive deltas of one choice as one (texts and tokens joined once;
    reasoning joined; tool-call pieces joined per tool call)."""
    first, last = group[0], group[-1]
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    reasoning: list[str] = []
    calls: list[ToolCallDelta] | None = None
    for d in group:
        token_ids += d.token_ids
        if d.logprobs is not None:
            logprobs = (logprobs or []) + d.logprobs
        if d.reasoning:
            reasoning.append(d.reasoning)
        if d.tool_calls:
            calls = join_tool_calls(calls or [], d.tool_calls)
    return Delta(
        first.request_id, first.index, "".join([d.text for d in group]), token_ids,
        last.num_prompt_tokens, last.finish_reason, last.stop_reason, logprobs,
        first.prompt_text, first.prompt_token_ids, first.prompt_logprobs,
        "".join(reasoning) or None, calls, last.reasoning_tokens,
    )


def join_tool_calls(into: list[ToolCallDelta], pieces: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Tool-call pieces added to `into` (a new list): pieces of a tool call
    already there extend it (its id and name kept, arguments appended), others
    are added, in order of index. What a client reassembles is unchanged."""
    out = {c.index: ToolCallDelta(c.index, c.id, c.name, c.arguments) for c in into}
    for p in pieces:
        have = out.get(p.index)
        if have is None:
            out[p.index] = ToolCallDelta(p.index, p.id, p.name, p.arguments)
        else:
            have.id = have.id or p.id
            have.name = have.name or p.name
            have.arguments += p.arguments
    return [out[i] for i in sorted(out)]


class RequestStream:
    """What one client request receives from its engine request(s), and the one
    owner of whether it is finished (every choice of every engine request ended).

    Read with `async for batch in stream` (or `await stream.next()`, None at the
    end): each batch is what arrived since the last, so a lagging reader catches up
    in one go, merged to one delta per choice unless the stream keeps `exact`
    batches (RunPod's standard mode cuts batches at token counts). A failure is
    raised after the output that came before it: the engine's (`StreamFailed`), or
    whatever `interrupt()` was given (a timeout, a client gone), at once."""

    __slots__ = ("request_ids", "engine", "exact", "key_bytes", "prompt_tokens", "n", "_unfinished", "_items",
                 "_waiter", "error", "direct")

    def __init__(self, request_ids: list[str], n: int, engine: Any, exact: bool = False, key_bytes: int = 0) -> None:
        self.request_ids = request_ids
        self.engine = engine
        self.exact = exact
        # The prompts' routing key bytes, and their token counts as the engine
        # reported them when they finished: what the router learns from.
        self.key_bytes = key_bytes
        self.prompt_tokens = 0
        self.n = n  # choices per engine request (samples, as vLLM's scheduler counts them)
        self._unfinished = len(request_ids) * n  # choices not yet ended
        self._items: list[Delta] = []
        self._waiter: asyncio.Future | None = None
        self.error: Exception | None = None
        # A reader that takes output as it is delivered, in the receive path,
        # rather than being woken for it: an SSE stream writes it to its socket
        # (http/sse.py). It answers False when it cannot now (its reader is not
        # waiting, its socket is full, the output ends the stream): then the
        # waiting reader is woken as for any other.
        self.direct: Callable[[], bool] | None = None

    @property
    def finished(self) -> bool:
        """Every choice has ended (its last output may still be unread)."""
        return self._unfinished <= 0

    @property
    def pending(self) -> bool:
        """Output has arrived that was not read yet."""
        return bool(self._items)

    @property
    def unsent(self) -> int:
        """Engine outputs arrived and not read yet."""
        return len(self._items)

    def push(self, delta: Delta) -> None:
        self.add(delta)
        self.deliver()

    def add(self, delta: Delta) -> None:
        """Output arrived; the reader gets it at `deliver()` (once per engine message)."""
        if self.error is None:
            self._items.append(delta)
            if delta.finish_reason is not None:
                self._unfinished -= 1
                if delta.index == 0:
                    self.prompt_tokens += delta.num_prompt_tokens

    def deliver(self) -> None:
        direct = self.direct
        if direct is None or not self._items or not direct():
            self._wake()

    @property
    def waiting(self) -> bool:
        """The reader waits in `next()` for output."""
        w = self._waiter
        return w is not None and not w.done()

    def take(self) -> list[Delta]:
        """The output arrived and not taken yet (merged, unless `exact`)."""
        items, self._items = self._items, []
        return items if self.exact else merge(items)

    def fail(self, failure: RequestFailed) -> None:
        """The engine's failure: what it produced before still comes out first."""
        self._end(StreamFailed(failure))

    def interrupt(self, error: Exception) -> None:
        """End the stream with `error` now (a timeout, a client gone), dropping
        output not yet taken."""
        self._items = []
        self._end(error)

    def _end(self, error: Exception) -> None:
        if self.error is None:  # the first error wins
            self.error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> list[Delta] | None:
        """The next batch; None once finished and read to the end."""
        while not self._items:
            if self.error is not None:
                raise self.error
            if self._unfinished <= 0:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self.take()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> list[Delta]:
        batch = await self.next()
        if batch is None:
            raise StopAsyncIteration
        return batch


OneAnswer = Union[Tokenize, Detokenize, Embed, LoadAdapter, UnloadAdapter]


class Reply:
    """The one answer an engine gives to a `OneAnswer` request."""

    __slots__ = ("engine", "_future")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._future.done()

    def resolve(self, answer: Any) -> None:
        if not self._future.done():
            self._future.set_result(answer)

    def fail(self, failure: RequestFailed) -> None:
        if not self._future.done():
            self._future.set_exception(StreamFailed(failure))

    async def wait(self, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout_s)
        except asyncio.TimeoutError:
            raise StreamFailed(RequestFailed("", FailureKind.ENGINE_UNAVAILABLE,
                                             f"the engine did not answer within {timeout_s:g} s")) from None


class StreamFailed(Exception):
    def __init__(self, failure: RequestFailed) -> None:
        super().__init__(failure.message)
        self.failure = failure


