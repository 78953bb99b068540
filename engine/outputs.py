"""Results out: vLLM's `RequestOutput` deltas as our `Delta` messages, logprobs
included (the output side, as vLLM's own `output_processor.py` is)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vllm_gateway.engine.chat import ChoiceParser
from vllm_gateway.engine.inputs import Rendered
from vllm_gateway.protocol.messages import Delta, Generate, TokenLogprob


class OutputBuilder:
    """One request's outputs: a `Delta` per choice per step; the prompt (and its
    logprobs) on the first, when the gateway asked for it. A chat request whose
    output vLLM's parsers read (tools, reasoning) has one parser per choice.
    Collects the finish reasons for the engine's metrics."""

    def __init__(self, req: Generate, rendered: Rendered, tokenizer: Any,
                 parsers: Callable[[], ChoiceParser] | None = None) -> None:
        self.req = req
        self.rendered = rendered
        self.tokenizer = tokenizer
        self.num_prompt = len(rendered.prompt_ids)
        self.k = req.params.logprobs or 0
        self.want_logprobs = req.params.logprobs is not None
        self.reasons: list[str] = []
        self._first = True
        self._new_parser = parsers
        self._parsers: dict[int, ChoiceParser] = {}
        # Hidden reasoning hides its tokens' logprobs too (as vLLM does).
        chat = rendered.chat
        if parsers is not None and chat is not None and not chat.request.include_reasoning:
            self.want_logprobs = False

    def deltas(self, out: Any) -> list[Delta]:
        rid = self.req.request_id
        result = []
        for c in out.outputs:
            # Positional: this runs for every token of every stream.
            delta = Delta(rid, c.index, c.text, list(c.token_ids), self.num_prompt, c.finish_reason, c.stop_reason,
                          sample_logprobs(c.token_ids, c.logprobs, self.k) if self.want_logprobs else None)
            if self._new_parser is not None:
                self._parse(delta)
            if delta.finish_reason is not None:
                self.reasons.append(delta.finish_reason)
            if self._first:
                self._first = False
                if self.req.return_prompt:
                    self._add_prompt(delta, out)
            result.append(delta)
        return result

    def _parse(self, delta: Delta) -> None:
        """The delta's text through its choice's parser: content, reasoning, tool calls."""
        parser = self._parsers.get(delta.index)
        if parser is None:
            assert self._new_parser is not None
            parser = self._parsers[delta.index] = self._new_parser()
        finished = delta.finish_reason is not None
        parsed = parser.step(delta.text, delta.token_ids, finished)
        delta.text = parsed.content
        delta.reasoning = parsed.reasoning or None
        delta.tool_calls = parsed.tool_calls
        if finished:
            delta.finish_reason = parser.finish_reason(delta.finish_reason)
            delta.reasoning_tokens = parser.reasoning_tokens()

    def _add_prompt(self, delta: Delta, out: Any) -> None:
        ids = self.rendered.prompt_ids
        delta.prompt_text = self.rendered.prompt_text
        delta.prompt_token_ids = ids
        if self.req.params.prompt_logprobs is not None:
            delta.prompt_logprobs = prompt_logprobs(
                ids, out.prompt_logprobs, self.req.params.prompt_logprobs, self.tokenizer.decode(ids[:1]))


def _entry(token_id: int, lp) -> tuple[str, float, int]:
    return (lp.decoded_token or "", float(lp.logprob), token_id)


def position_logprobs(token_id: int, position: Mapping[int, object] | None, k: int) -> TokenLogprob | None:
    """One position of vLLM's logprobs ({token_id: Logprob}) as a `TokenLogprob`:
    the chosen token and the `k` best alternatives by rank."""
    if not position:
        return None
    chosen = position.get(token_id)
    top = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    top_entries = [_entry(tid, lp) for tid, lp in top[:k]] if k else []
    if chosen is None:
        return TokenLogprob(token_id, "", float("-inf"), top_entries)
    return TokenLogprob(token_id, chosen.decoded_token or "", float(chosen.logprob), top_entries)


def sample_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, object]] | None, k: int) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    out = []
    for tid, pos in zip(token_ids, logprobs):
        item = position_logprobs(tid, pos, k)
        if item is not None:
            out.append(item)
    return out


def prompt_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[Mapping[int, object] | None] | None, k: int, first_token: str
) -> list[TokenLogprob | None] | None:
    """The prompt's logprobs; the first token has none, only its text."""
    if logprobs is None:
        return None
    out = [position_logprobs(tid, pos, k) if pos else None for tid, pos in zip(token_ids, logprobs)]
    if out and out[0] is None:
        out[0] = TokenLogprob(token_ids[0], first_token, None)
    return out
