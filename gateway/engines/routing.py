"""Which engine gets a request: the least loaded (`ROUTING=least_loaded`), or the
one most likely to hold the request's prefix in its KV cache (`ROUTING=prefix`),
within a load margin of the least loaded.

vLLM caches KV blocks by a hash chain over the prompt's token blocks, and keeps
freed blocks until it needs the space, least recently used first. An engine that
served a prompt recently serves another with the same beginning from its cache:
prefill is skipped for the shared part. Spread over engines by load alone, every
tenant's prefix ends up cached on every engine, each evicting the others'.

The gateway does not tokenize (the engines render chat templates), so it cannot
compute vLLM's block hashes; it keeps its own record instead, as SGLang's router
does: per engine, a hash chain over fixed-size blocks of each request's prompt
bytes (its text, its token ids, or its messages and tools as sent), most
recently used first, cut to the engine's KV capacity (`EngineStatus.kv_cache_tokens`,
at the bytes of key per prompt token learnt from the requests served,
`Router.learn`). A request goes to the engine whose record holds the longest run
of its leading blocks, unless that engine is busier than the least loaded by
more than the margin (`ROUTING_BALANCE_ABS` requests and `ROUTING_BALANCE_REL`
times): then a hot prefix spills over to the least loaded, which caches it too.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from vllm_gateway.protocol.messages import ChatPrompt, Generate, TextPrompt, TokensPrompt

RoutingPolicy = Literal["least_loaded", "prefix"]
POLICIES: tuple[str, ...] = ("least_loaded", "prefix")

# Record granularity. A prompt shorter than one block is not recorded: its
# prefix is too short to be worth steering for.
BLOCK_BYTES = 128
# For sizing a record to an engine's KV capacity before any request has told
# how many bytes of key a prompt token takes: English text runs at about four
# bytes a token in the BPE vocabularies of today's models. Then the router learns
# it (code, other languages and random words run at 3 to 7; a chat key carries
# JSON around each message). An under-estimate forgets a tenant early: its next
# request is placed by load, on an engine that does not hold its prefix.
BYTES_PER_TOKEN = 4.0
# The learnt figure weighs about this many prompt tokens of recent requests; it
# starts as this many at BYTES_PER_TOKEN, so one odd request does not swing it.
LEARN_WINDOW_TOKENS = 200_000
LEARN_PRIOR_TOKENS = 4096
# Without a reported capacity (an engine of before `kv_cache_tokens`).
DEFAULT_CAPACITY_BLOCKS = 1 << 20


class Routable(Protocol):
    """What the router needs of an engine connection."""

    @property
    def load(self) -> float: ...  # requests

    @property
    def kv_cache_usage(self) -> float: ...  # breaks ties of load

    record: "PrefixRecord"


def prefix_key(gen: Generate) -> bytes:
    """The bytes whose beginning decides a request's KV-cache prefix. The model
    comes first: a LoRA adapter's KV cache is its own."""
    p = gen.prompt
    head = gen.model.encode() + b"\x00"
    if isinstance(p, TextPrompt):
        return head + p.text.encode("utf-8", "surrogatepass")
    if isinstance(p, TokensPrompt):
        return head + array.array("q", p.token_ids).tobytes()
    assert isinstance(p, ChatPrompt)
    # Templates put the tools in front (in the system prompt); a JSON list's
    # encoding begins with its first items' encodings, so a conversation that
    # grows keeps its earlier turns' prefix.
    return head + msgspec.json.encode(p.tools or []) + msgspec.json.encode(p.messages)


def block_hashes(key: bytes) -> list[int]:
    """A hash chain over the key's whole blocks: equal leading blocks, equal hashes."""
    out = []
    h = 0
    for start in range(0, len(key) - BLOCK_BYTES + 1, BLOCK_BYTES):
        h = hash((h, key[start:start + BLOCK_BYTES]))
        out.append(h)
    return out


class PrefixRecord:
    """The block hashes an engine was sent, least recently used first, at most
    `capacity` of them (its KV cache's size in blocks of the record)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def resize(self, kv_cache_tokens: int, bytes_per_token: float = BYTES_PER_TOKEN) -> None:
        if kv_cache_tokens > 0:
            self.capacity = max(1, int(kv_cache_tokens * bytes_per_token) // BLOCK_BYTES)
            self._evict()

    def matched(self, hashes: Sequence[int]) -> int:
        """How many of the leading blocks the record holds."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[int]) -> None:
        """Record a request's blocks. Its first blocks become the most recent, as in
        vLLM, which frees a finished request's blocks last to first: a shared
        prefix outlives the tails that branch from it."""
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        self._evict()

    def clear(self) -> None:
        self._blocks.clear()

    def _evict(self) -> None:
        blocks = self._blocks
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


@dataclass
class Balance:
    """How much busier than the least-loaded engine a prefix's engine may be and
    still get the request (both must be exceeded to spill over)."""

    abs: float = 8.0  # requests
    rel: float = 1.5  # times

    def within(self, load: float, least: float) -> bool:
        return load - least <= self.abs or load <= least * self.rel


Choice = Literal["prefix", "least_loaded", "spill"]


class Router:
    def __init__(self, policy: RoutingPolicy = "least_loaded", balance: Balance | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: one of {', '.join(POLICIES)}")
        self.policy = policy
        self.balance = balance or Balance()
        # Key bytes and prompt tokens of the requests served, decayed to the window.
        self._bytes = BYTES_PER_TOKEN * LEARN_PRIOR_TOKENS
        self._tokens = float(LEARN_PRIOR_TOKENS)
        self._sized_at = BYTES_PER_TOKEN

    @property
    def bytes_per_token(self) -> float:
        return self._bytes / self._tokens

    def learn(self, key_bytes: int, prompt_tokens: int) -> bool:
        """A served request's prefix key length and its prompt's token count (as the
        engine rendered it). True when the estimate moved a tenth away from the
        one the records were last sized at: time to resize them."""
        if key_bytes <= 0 or prompt_tokens <= 0:
            return False
        keep = max(0.0, 1.0 - prompt_tokens / LEARN_WINDOW_TOKENS)
        self._bytes = self._bytes * keep + key_bytes
        self._tokens = self._tokens * keep + prompt_tokens
        now = self.bytes_per_token
        if abs(now - self._sized_at) <= 0.1 * self._sized_at:
            return False
        self._sized_at = now
        return True

    def pick(self, engines: Sequence[Routable], gens: Sequence[Generate]) -> tuple[Routable, Choice, int]:
        """The engine for a client request's prompts (`engines`: ready, serving the
        model; not empty), why it was chosen, and the bytes of its prompts' keys
        (for `learn`; 0 under least-loaded)."""
        # (requests, KV-cache use), each one a look over the engine's streams. The
        # margins weigh requests alone: a fraction of KV cache on top would make a
        # load of exactly the margin count as over it.
        loads = {id(e): (e.load, e.kv_cache_usage) for e in engines}
        least = min(engines, key=lambda e: loads[id(e)])
        if self.policy == "least_loaded":
            return least, "least_loaded", 0
        keys = [prefix_key(g) for g in gens]
        chains = [block_hashes(k) for k in keys]
        chosen: Routable = least
        why: Choice = "least_loaded"
        if len(engines) > 1 and any(chains):
            matched = {id(e): sum(e.record.matched(c) for c in chains) for e in engines}
            least_load = loads[id(least)][0]
            eligible = [e for e in engines if self.balance.within(loads[id(e)][0], least_load)]
            best = max(eligible, key=lambda e: (matched[id(e)], -loads[id(e)][0], -loads[id(e)][1]))
            if matched[id(best)]:
                chosen, why = best, "prefix"
            elif any(matched.values()):
                why = "spill"  # its engines are too busy: the least loaded learns the prefix too
        for c in chains:
            chosen.record.add(c)
        return chosen, why, sum(map(len, keys))
