"""Conversions between protocol messages and vLLM's own objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from vllm import SamplingParams as VllmSamplingParams
from vllm.sampling_params import RequestOutputKind

from protocol.messages import SamplingParams, TokenLogprob


def sampling_params(p: SamplingParams, max_tokens: int) -> VllmSamplingParams:
    """vLLM sampling parameters (our fields carry vLLM's names), streaming deltas.
    vLLM validates them again and raises on what it rejects."""
    fields = msgspec.structs.asdict(p)
    fields.update(max_tokens=max_tokens, stop=p.stop or None, stop_token_ids=p.stop_token_ids or None)
    return VllmSamplingParams(**fields, output_kind=RequestOutputKind.DELTA)


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
