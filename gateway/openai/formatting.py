"""Engine deltas -> OpenAI objects: streaming chunks and whole responses.

`ChatFormatter` and `CompletionFormatter` keep the per-choice state of one client
request (token counts, echoed prompts, text offsets) and turn each batch of deltas
into chunk objects; the same objects are sent as SSE by the HTTP server and as job
output by the RunPod handler. One chunk per choice per batch: a consumer that falls
behind gets the tokens it missed merged, not one event per token.
"""

from __future__ import annotations

import uuid

from vllm_gateway.gateway.core.answer import Answer, Book, OutputLogprob, TokenUsage, output_logprobs
from vllm_gateway.protocol.messages import Delta, TokenLogprob, ToolCallDelta
from vllm_gateway.gateway.openai.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionTokensDetails,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    Usage,
)

def openai_usage(u: TokenUsage) -> Usage:
    details = CompletionTokensDetails(u.reasoning) if u.reasoning is not None else None
    return Usage(u.prompt, u.completion, u.total, details)


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(output_logprobs(items))


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
        self.answers = [Answer() for _ in range(n)]
        self.logprobs: list[list[OutputLogprob] | None] = [None] * n

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
            out.append(self._chunk([choice], openai_usage(self.book.usage()) if self.continuous_usage else None))
        return out

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], openai_usage(self.book.usage()))

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            idx, _ = self.book.account(d)
            self.answers[idx].add(d)
            if d.logprobs is not None:
                self.logprobs[idx] = (self.logprobs[idx] or []) + chat_logprobs(d.logprobs).content

    def message(self, i: int) -> ChatMessage:
        answer = self.answers[i]
        calls = [ToolCall(c.id or f"chatcmpl-tool-{uuid.uuid4().hex}", FunctionCall(c.name or "", c.arguments))
                 for c in answer.tool_calls]
        text = answer.text
        return ChatMessage(self.role, text if text or not calls else None, answer.reasoning, calls)

    def response(self) -> ChatCompletion:
        b = self.book
        choices = [
            ChatChoice(
                i, self.message(i),
                ChatLogprobs(self.logprobs[i]) if self.logprobs[i] is not None else None,
                self.answers[i].finish_reason, self.answers[i].stop_reason,
            )
            for i in range(b.n)
        ]
        return ChatCompletion(b.id, b.created, b.model, choices, openai_usage(b.usage()))


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
            out.append(Completion(b.id, b.created, b.model, [choice], usage=openai_usage(b.usage()) if self.continuous_usage else None))
        return out

    def usage_chunk(self) -> Completion:
        b = self.book
        return Completion(b.id, b.created, b.model, [], usage=openai_usage(b.usage()))

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
        return Completion(b.id, b.created, b.model, choices, usage=openai_usage(b.usage()))
