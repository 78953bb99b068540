"""Engine deltas -> OpenAI objects: streaming chunks and whole responses.

`ChatFormatter` and `CompletionFormatter` keep the per-choice state of one client
request (token counts, echoed prompts, text offsets) and turn each batch of deltas
into chunk objects; the same objects are sent as SSE by the HTTP server and as job
output by the RunPod handler. One chunk per choice per batch: a consumer that falls
behind gets the tokens it missed merged, not one event per token.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from vllm_gateway.gateway.engines.client import join_tool_calls
from vllm_gateway.protocol.messages import Delta, TokenLogprob, ToolCallDelta
from vllm_gateway.gateway.openai.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionTokensDetails,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    TopLogprob,
    Usage,
    json_encode,
)

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: object) -> bytes:
    return b"data: " + json_encode(obj) + b"\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Formatter(Protocol):
    """What a call needs of a formatter: engine deltas in, the intake's objects
    out. Formatters only format: whether the request is finished is its stream's."""

    book: "Book"

    def chunks(self, deltas: list[Delta]) -> list[Any]:
        """The stream objects for one batch of deltas."""

    def add(self, deltas: list[Delta]) -> None:
        """Accumulate a batch for the whole (non-streaming) answer."""

    def response(self) -> Any:
        """The whole answer, once every delta was added."""


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

    def usage(self) -> Usage:
        p = sum(self.prompt_tokens.values())
        details = None
        if self.reasoning_tokens is not None:
            details = CompletionTokensDetails(sum(self.reasoning_tokens.values()))
        return Usage(p, self.completion_tokens, p + self.completion_tokens, details)


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="surrogatepass"))


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs([
        ChatTokenLogprob(
            lp.token, max(lp.logprob, -9999.0), _utf8(lp.token),  # as vLLM clamps (JSON has no -inf)
            [TopLogprob(t, max(v, -9999.0), _utf8(t)) for t, v, _ in lp.top],
        )
        for lp in items
    ])


def _delta_tool_calls(calls: list[ToolCallDelta]) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(c.index, c.id, "function" if c.id else None,
                      DeltaFunctionCall(c.name, c.arguments if (c.arguments or c.name) else None))
        for c in calls
    ]


class ChatFormatter:
    def __init__(self, request_id: str, n: int, model: str, role: str, *, continuous_usage: bool = False) -> None:
        self.book = Book([request_id], n, model, "chatcmpl")
        self.role = role
        self.continuous_usage = continuous_usage
        # Non-streaming accumulation.
        self.texts = [""] * n
        self.reasoning: list[list[str]] = [[] for _ in range(n)]
        self.tool_calls: list[list[ToolCallDelta]] = [[] for _ in range(n)]
        self.logprobs: list[list[ChatTokenLogprob] | None] = [None] * n
        self.finish: list[tuple[str | None, str | int | None]] = [(None, None)] * n

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        b = self.book
        return ChatCompletionChunk(b.id, b.created, b.model, choices, usage=usage)

    def role_chunk(self) -> ChatCompletionChunk:
        """The first chunk of a stream: the role of every choice."""
        return self._chunk([ChatChunkChoice(i, ChatDelta(role=self.role, content="")) for i in range(self.book.n)])

    def chunks(self, deltas: list[Delta]) -> list[ChatCompletionChunk]:
        out = []
        for d in deltas:
            idx, _ = self.book.account(d)
            if not (d.text or d.reasoning or d.tool_calls or d.finish_reason or d.logprobs):
                continue  # tokens a parser holds back (tool-call markup, say): counted, not sent
            lp = chat_logprobs(d.logprobs) if d.logprobs is not None else None
            parsed = d.reasoning is not None or d.tool_calls is not None
            delta = ChatDelta(
                content=d.text if d.text or not parsed else None,
                reasoning=d.reasoning,
                tool_calls=_delta_tool_calls(d.tool_calls) if d.tool_calls else None,
            )
            choice = ChatChunkChoice(idx, delta, lp, d.finish_reason, d.stop_reason)
            out.append(self._chunk([choice], self.book.usage() if self.continuous_usage else None))
        return out

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], self.book.usage())

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            idx, _ = self.book.account(d)
            self.texts[idx] += d.text
            if d.reasoning:
                self.reasoning[idx].append(d.reasoning)
            if d.tool_calls:
                self.tool_calls[idx] = join_tool_calls(self.tool_calls[idx], d.tool_calls)
            if d.logprobs is not None:
                self.logprobs[idx] = (self.logprobs[idx] or []) + chat_logprobs(d.logprobs).content
            if d.finish_reason is not None:
                self.finish[idx] = (d.finish_reason, d.stop_reason)

    def message(self, i: int) -> ChatMessage:
        calls = [ToolCall(c.id or f"chatcmpl-tool-{uuid.uuid4().hex}", FunctionCall(c.name or "", c.arguments))
                 for c in self.tool_calls[i]]
        text = self.texts[i]
        return ChatMessage(self.role, text if text or not calls else None,
                           "".join(self.reasoning[i]) if self.reasoning[i] else None, calls)

    def response(self) -> ChatCompletion:
        b = self.book
        choices = [
            ChatChoice(
                i, self.message(i),
                ChatLogprobs(self.logprobs[i]) if self.logprobs[i] is not None else None,
                self.finish[i][0], self.finish[i][1],
            )
            for i in range(b.n)
        ]
        return ChatCompletion(b.id, b.created, b.model, choices, b.usage())


class CompletionFormatter:
    def __init__(self, request_ids: list[str], n: int, model: str, *, echo: bool, continuous_usage: bool = False) -> None:
        self.book = Book(request_ids, n, model, "cmpl")
        self.echo = echo
        self.continuous_usage = continuous_usage
        self.prompt_text: dict[str, str] = {}
        self.prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        total = self.book.total_choices
        self.offsets = [0] * total  # characters of text so far, per choice
        self.texts = [""] * total
        self.logprobs: list[CompletionLogprobs | None] = [None] * total
        self.finish: list[tuple[str | None, str | int | None]] = [(None, None)] * total

    def _piece(self, d: Delta) -> tuple[int, str, CompletionLogprobs | None]:
        """Global index, text and logprobs of one delta, with the echoed prompt
        in front of a choice's first delta."""
        if d.prompt_text is not None:
            self.prompt_text[d.request_id] = d.prompt_text
            if d.prompt_logprobs is not None:
                self.prompt_logprobs[d.request_id] = d.prompt_logprobs
        idx, first = self.book.account(d)
        text = d.text
        items: list[TokenLogprob | None] | None = list(d.logprobs) if d.logprobs is not None else None
        if first and self.echo:
            text = self.prompt_text.get(d.request_id, "") + text
            if items is not None:
                items = self.prompt_logprobs.get(d.request_id, []) + items
        lp = None
        if items is not None:
            lp = CompletionLogprobs([], [], [], [])
            offset = self.offsets[idx]
            for item in items:
                if item is None:  # the first prompt token has no logprob
                    lp.tokens.append("")
                    lp.token_logprobs.append(None)
                    lp.top_logprobs.append(None)
                    lp.text_offset.append(offset)
                    continue
                lp.tokens.append(item.token)
                lp.token_logprobs.append(None if item.logprob is None else max(item.logprob, -9999.0))
                lp.top_logprobs.append({t: max(v, -9999.0) for t, v, _ in item.top})
                lp.text_offset.append(offset)
                offset += len(item.token)
        self.offsets[idx] += len(text)
        return idx, text, lp

    def chunks(self, deltas: list[Delta]) -> list[Completion]:
        b = self.book
        out = []
        for d in deltas:
            idx, text, lp = self._piece(d)
            choice = CompletionChoice(idx, text, lp, d.finish_reason, d.stop_reason)
            out.append(Completion(b.id, b.created, b.model, [choice], usage=b.usage() if self.continuous_usage else None))
        return out

    def usage_chunk(self) -> Completion:
        b = self.book
        return Completion(b.id, b.created, b.model, [], usage=b.usage())

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            idx, text, lp = self._piece(d)
            self.texts[idx] += text
            if lp is not None:
                prev = self.logprobs[idx]
                if prev is None:
                    self.logprobs[idx] = lp
                else:
                    prev.tokens += lp.tokens
                    prev.token_logprobs += lp.token_logprobs
                    prev.top_logprobs += lp.top_logprobs
                    prev.text_offset += lp.text_offset
            if d.finish_reason is not None:
                self.finish[idx] = (d.finish_reason, d.stop_reason)

    def response(self) -> Completion:
        b = self.book
        choices = [
            CompletionChoice(i, self.texts[i], self.logprobs[i], self.finish[i][0], self.finish[i][1])
            for i in range(b.total_choices)
        ]
        return Completion(b.id, b.created, b.model, choices, usage=b.usage())
