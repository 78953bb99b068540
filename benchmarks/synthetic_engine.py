"""A synthetic load-generator engine, for measuring the gateway alone.

Not an engine: it runs no model. It speaks the real protocol (protocol/messages.py)
on a ZeroMQ ROUTER like `engine/server.py`, reports itself ready, and answers every
`Generate` with `max_tokens` one-character tokens, `--tokens-per-step` per
request every `--step-ms`, all requests' deltas of a step in one `Outputs` message
per gateway, the way a real engine step does. `Abort` stops a request. Token k
of every choice is the digit `k % 10`, so a client can check that nothing was
lost or reordered: the text of a whole answer is `expected_text(max_tokens)`.

    python benchmarks/synthetic_engine.py --endpoint ipc:///tmp/synth --step-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import zmq
import zmq.asyncio

from vllm_gateway.protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Delta,
    EngineStatus,
    Generate,
    Hello,
    Outputs,
    decode_gateway_message,
    encode,
)


DIGITS = "0123456789" * 2


def expected_text(num_tokens: int) -> str:
    return ("0123456789" * (num_tokens // 10 + 1))[:num_tokens]


class Request:
    __slots__ = ("rid", "ident", "left", "sent", "prompt_tokens", "n")

    def __init__(self, rid: str, ident: bytes, max_tokens: int, n: int) -> None:
        self.rid = rid
        self.ident = ident
        self.left = max_tokens
        self.sent = 0
        self.prompt_tokens = 8
        self.n = n


async def serve(endpoint: str, step_s: float, tokens_per_step: int, model: str) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    instance = uuid.uuid4().hex[:12]
    running: dict[str, Request] = {}
    gateways: set[bytes] = set()

    def status(ident: bytes) -> bytes:
        samples = sum(r.n for r in running.values())
        mine = sum(r.n for r in running.values() if r.ident == ident)
        return encode(EngineStatus("synthetic", instance, "ready", model, 1 << 20, samples, 0, 0.0, pid=os.getpid(),
                                   protocol_version=PROTOCOL_VERSION, in_engine=mine))

    async def receive() -> None:
        while True:
            ident, payload = await sock.recv_multipart()
            msg = decode_gateway_message(payload)
            if isinstance(msg, Generate):
                running[msg.request_id] = Request(msg.request_id, ident, msg.params.max_tokens or 16, msg.params.n)
            elif isinstance(msg, Abort):
                for rid in msg.request_ids:
                    running.pop(rid, None)
            elif isinstance(msg, Hello):
                gateways.add(ident)
                await sock.send_multipart([ident, status(ident)])

    async def steps() -> None:
        token_ids = list(range(100, 100 + tokens_per_step))
        next_status = 0.0
        while True:
            started = time.monotonic()
            out: dict[bytes, list[Delta]] = {}
            finished = []
            for r in running.values():
                k = min(tokens_per_step, r.left)
                r.left -= k
                start = r.sent % 10
                text = DIGITS[start:start + k] if k <= 10 else expected_text(start + k)[start:]
                r.sent += k
                reason = "length" if r.left == 0 else None
                deltas = out.setdefault(r.ident, [])
                for i in range(r.n):
                    deltas.append(Delta(r.rid, i, text, token_ids[:k], r.prompt_tokens, reason))
                if reason:
                    finished.append(r.rid)
            for rid in finished:
                del running[rid]
            for ident, deltas in out.items():
                await sock.send_multipart([ident, encode(Outputs(deltas))])
            if started >= next_status:
                next_status = started + 0.1
                for ident in gateways:
                    await sock.send_multipart([ident, status(ident)])
            await asyncio.sleep(max(0.0, step_s - (time.monotonic() - started)))

    await asyncio.gather(receive(), steps())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--tokens-per-step", type=int, default=1)
    p.add_argument("--model", default="synthetic")
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(a.endpoint, a.step_ms / 1000, a.tokens_per_step, a.model))


if __name__ == "__main__":
    main()
