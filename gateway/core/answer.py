"""What every intake's formatter shares: the accounting of one client request
(ids, choice indexes, token counts as a neutral `TokenUsage`) and a whole answer
accumulated from its deltas (`Answer`). Each API shapes these its own way."""

from __future__ import annotations

import dataclasses
import time
import uuid

from msgspec import Struct

from vllm_gateway.gateway.engines.streams import join_tool_calls
from vllm_gateway.protocol.messages import Delta, TokenLogprob, ToolCallDelta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class OutputLogprob(Struct):
    """One output token's log probability, as chat completions and the
    Responses API both give it."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="surrogatepass"))


def output_logprobs(items: list[TokenLogprob]) -> list[OutputLogprob]:
    return [
        OutputLogprob(
            lp.token, max(lp.logprob, -9999.0), _utf8(lp.token),  # as vLLM clamps (JSON has no -inf)
            [TopLogprob(t, max(v, -9999.0), _utf8(t)) for t, v, _ in lp.top],
        )
        for lp in items if lp.logprob is not None
    ]


@dataclasses.dataclass(frozen=True)
class TokenUsage:
    """Token counts of one client request, whatever API it came in by."""

    prompt: int
    completion: int
    reasoning: int | None = None  # with a reasoning parser: the completion tokens that were reasoning

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class Book:
    """Accounting shared by the formatters: ids, choice indexes, token counts."""

    def __init__(self, request_ids: list[str], n: int, model: str, prefix: str) -> None:
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.base = {rid: i * n for i, rid in enumerate(request_ids)}
        self.total_choices = n * len(request_ids)
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens = 0
        self.reasoning_tokens: dict[int, int] | None = None  # per choice, with a reasoning parser
        self.seen: set[int] = set()

    def account(self, d: Delta) -> tuple[int, bool]:
        """Global choice index of `d`, and whether this is the choice's first delta."""
        idx = self.base[d.request_id] + d.index
        self.prompt_tokens[d.request_id] = d.num_prompt_tokens
        self.completion_tokens += len(d.token_ids)
        if d.reasoning_tokens is not None:
            if self.reasoning_tokens is None:
                self.reasoning_tokens = {}
            self.reasoning_tokens[idx] = d.reasoning_tokens
        first = idx not in self.seen
        if first:
            self.seen.add(idx)
        return idx, first

    def usage(self) -> TokenUsage:
        reasoning = sum(self.reasoning_tokens.values()) if self.reasoning_tokens is not None else None
        return TokenUsage(sum(self.prompt_tokens.values()), self.completion_tokens, reasoning)


class Answer:
    """One choice's whole (non-streamed) answer, accumulated from its deltas:
    text, reasoning, tool calls (pieces joined per call), and how it ended."""

    __slots__ = ("_text", "_reasoning", "tool_calls", "finish_reason", "stop_reason", "logprobs")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self.tool_calls: list[ToolCallDelta] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] = []  # when asked for

    def add(self, d: Delta) -> None:
        if d.text:
            self._text.append(d.text)
        if d.logprobs:
            self.logprobs += d.logprobs
        if d.reasoning:
            self._reasoning.append(d.reasoning)
        if d.tool_calls:
            self.tool_calls = join_tool_calls(self.tool_calls, d.tool_calls)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str | None:
        """The reasoning, or None where there was none."""
        return "".join(self._reasoning) if self._reasoning else None


class OneChoiceAnswer:
    """The whole-answer half of a one-choice API's formatter (Anthropic's
    messages, Responses): its accounting and its accumulated answer."""

    def __init__(self, request_id: str, model: str, prefix: str) -> None:
        self.book = Book([request_id], 1, model, prefix)
        self.answer = Answer()

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            self.book.account(d)
            self.answer.add(d)
