"""Soak: many concurrent streams for a bounded time, every answer checked whole and
in order, the gateway's memory sampled throughout.

    .venv/bin/python benchmarks/soak.py --streams 1000 --duration 300                 # gateway alone
    .venv/bin/python benchmarks/soak.py --engine real --streams 128 --duration 120   # real vLLM engine

`--engine synthetic` (default) puts one HTTP gateway in front of
`synthetic_engine.py`, whose token k is the digit `k % 10`: each answer's streamed
text must be exactly `0123456789012...` of `max_tokens` characters (nothing lost,
nothing reordered, nothing duplicated) and its `usage` must agree. `--engine real`
runs `vllm-gateway serve` with the default model (float32, eager); there the
model's text cannot be predicted, so each answer must bring exactly `max_tokens`
tokens (`logprobs` lists every token the gateway passed on; `ignore_eos`), agree
with `usage`, end with `finish_reason` "length" and `[DONE]`.

Clients loop for `--duration` seconds; then the figures: answers checked, tokens,
answers lost or wrong, errors, and the gateway's resident memory (after warm-up,
peak, at the end, and the slope of a line fitted through the samples). Ends by
printing one JSON line.

`--overload` offers more than the box serves, open loop: first `--probe-s` seconds
of `--max-concurrent` closed-loop clients measure what it serves (answers/s), then
requests arrive at `--overload` times that rate for `--duration` seconds, whatever
the answers, against a gateway with MAX_CONCURRENT_REQUESTS=`--max-concurrent`.
Figures: offered, admitted and shed (429) requests, goodput (whole answers and
their tokens per second), p50/p99 time to first token of the admitted, the
gateway's memory over time, and whether every admitted request finished whole.

    .venv/bin/python benchmarks/soak.py --overload 2 --engine real --max-concurrent 64 --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import psutil

ROOT = Path(__file__).resolve().parent.parent
from procs import free_port, report, sse_payloads, stop, wait_ready  # noqa: E402
from synthetic_engine import expected_text  # noqa: E402


class Tally:
    def __init__(self) -> None:
        self.answers = 0
        self.tokens = 0
        self.wrong = 0  # lost, reordered or duplicated tokens, or usage disagreeing
        self.errors = 0
        self.examples: list[str] = []

    def bad(self, why: str) -> None:
        self.wrong += 1
        if len(self.examples) < 5:
            self.examples.append(why)


class Answer:
    """One streamed completion as read: its texts, tokens, finish reason, usage,
    whether it ended with [DONE], an error event's message, and when its first
    token came."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tokens = 0
        self.finish: str | None = None
        self.usage: dict | None = None
        self.done = False
        self.error: str | None = None
        self.first_at: float | None = None


async def read_answer(r, real: bool) -> Answer:
    out = Answer()
    buf = b""
    async for data in r.content.iter_any():
        payloads, buf = sse_payloads(buf + data)
        for payload in payloads:
            if payload == b"[DONE]":
                out.done = True
                continue
            obj = msgspec.json.decode(payload)
            if "error" in obj:
                out.error = str(obj["error"].get("message"))
                return out
            for ch in obj["choices"]:
                if out.first_at is None and (ch.get("text") or (ch.get("logprobs") or {}).get("tokens")):
                    out.first_at = time.monotonic()
                out.texts.append(ch["text"])
                if real and ch.get("logprobs"):
                    out.tokens += len(ch["logprobs"]["tokens"])
                out.finish = ch.get("finish_reason") or out.finish
            out.usage = obj.get("usage") or out.usage
    return out


def check(answer: Answer, max_tokens: int, real: bool, t: Tally) -> None:
    """Count a whole answer, or say what is wrong with it."""
    text = "".join(answer.texts)
    got = answer.tokens if real else len(text)
    usage = answer.usage
    if not answer.done or answer.finish != "length":
        t.bad(f"ended without [DONE] or finish_reason length ({answer.finish})")
    elif usage is None or usage["completion_tokens"] != max_tokens or got != max_tokens:
        t.bad(f"{got} tokens streamed, usage {usage and usage['completion_tokens']}, asked {max_tokens}")
    elif not real and text != expected_text(max_tokens):
        t.bad(f"text out of order: {text[:40]!r}...")
    else:
        t.answers += 1
        t.tokens += got


async def one_answer(session, url: str, body: bytes, max_tokens: int, real: bool, t: Tally) -> None:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            t.errors += 1
            await asyncio.sleep(0.5)
            return
        answer = await read_answer(r, real)
    if answer.error is not None:
        t.errors += 1
        return
    check(answer, max_tokens, real, t)


async def client(session, url, body, max_tokens, real, t: Tally, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        try:
            await one_answer(session, url, body, max_tokens, real, t)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            t.errors += 1
            if len(t.examples) < 5:
                t.examples.append(f"{type(e).__name__}: {e}")


class Offered:
    """Open-loop arrivals: each request's fate."""

    def __init__(self) -> None:
        self.sent = 0
        self.shed = 0
        self.other = 0  # neither 200 nor 429
        self.ttft: list[float] = []
        self.tally = Tally()

    async def one(self, session, url: str, body: bytes, max_tokens: int, real: bool) -> None:
        self.sent += 1
        started = time.monotonic()
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if r.status == 429:
                    self.shed += 1
                    await r.read()
                    return
                if r.status != 200:
                    self.other += 1
                    self.tally.bad(f"status {r.status}: {(await r.read())[:200]!r}")
                    return
                answer = await read_answer(r, real)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self.tally.errors += 1
            self.tally.bad(f"{type(e).__name__}: {e}")
            return
        if answer.first_at is not None:
            self.ttft.append(answer.first_at - started)
        if answer.error is not None:
            self.tally.errors += 1
            self.tally.bad(f"error event: {answer.error}")
            return
        check(answer, max_tokens, real, self.tally)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


async def overload(port: int, a, gateway: psutil.Process) -> dict:
    real, url, body = request(port, a)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # 1. what the box serves: as many closed-loop clients as it admits
        probe = Tally()
        probe_started = time.monotonic()
        stop_at = probe_started + a.probe_s
        await asyncio.gather(*(client(session, url, body, a.output_len, real, probe, stop_at)
                               for _ in range(a.max_concurrent)))
        # over the whole probe, the answers finishing after `stop_at` included
        capacity = probe.answers / (time.monotonic() - probe_started)
        rate = capacity * a.overload
        print(f"serves {capacity:.2f} answers/s; offering {rate:.2f}/s for {a.duration:.0f} s", file=sys.stderr)
        # 2. open loop at `overload` times that
        o = Offered()
        tasks: set[asyncio.Task] = set()
        started = time.monotonic()
        rss: list[tuple[float, float]] = []
        next_sample = started
        k = 0
        while time.monotonic() - started < a.duration:
            due = started + k / rate
            now = time.monotonic()
            if now >= next_sample:
                rss.append((round(now - started), round(gateway.memory_info().rss / 1e6, 1)))
                next_sample += 10
                print(f"\r{now - started:5.0f} s: sent {o.sent}, shed {o.shed}, whole {o.tally.answers}, "
                      f"wrong {o.tally.wrong}, gateway {rss[-1][1]:.0f} MB", end="", file=sys.stderr, flush=True)
            if due > now:
                await asyncio.sleep(due - now)
            t = asyncio.create_task(o.one(session, url, body, a.output_len, real))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            k += 1
        await asyncio.gather(*tasks)  # every admitted request finishes
        elapsed = time.monotonic() - started
        rss.append((round(elapsed), round(gateway.memory_info().rss / 1e6, 1)))
    print(file=sys.stderr)
    admitted = o.sent - o.shed - o.other
    return {
        "mode": "overload", "engine": a.engine, "output_len": a.output_len, "max_concurrent": a.max_concurrent,
        "capacity_answers_per_s": round(capacity, 3), "offered_per_s": round(rate, 3), "duration_s": round(elapsed, 1),
        "offered": o.sent, "admitted": admitted, "shed": o.shed, "shed_share": round(o.shed / max(1, o.sent), 3),
        "other_status": o.other, "admitted_whole": o.tally.answers, "admitted_not_whole": o.tally.wrong,
        "goodput_answers_per_s": round(o.tally.answers / elapsed, 3),
        "goodput_tokens_per_s": round(o.tally.tokens / elapsed, 1),
        "ttft_s": {"p50": _pct(o.ttft, 0.5), "p99": _pct(o.ttft, 0.99)},
        "gateway_rss_mb": rss, "examples": o.tally.examples,
    }


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return 0.0
    xs = [s[0] for s in samples]
    ys = [s[1] / 1e6 for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def request(port: int, a) -> tuple[bool, str, bytes]:
    """Whether the engine is real, the URL, and the body every client sends: a
    streamed completion of exactly `output_len` tokens (with logprobs on a real
    engine, whose tokens are counted by them)."""
    real = a.engine == "real"
    req = {"model": a.model, "prompt": "Tell me a story:", "max_tokens": a.output_len, "stream": True,
           "ignore_eos": True, "stream_options": {"include_usage": True}}
    if real:
        req["logprobs"] = 0
    return real, f"http://127.0.0.1:{port}/v1/completions", msgspec.json.encode(req)


async def soak(port: int, a, gateway: psutil.Process) -> dict:
    real, url, body = request(port, a)
    t = Tally()
    started = time.monotonic()
    stop_at = started + a.warmup + a.duration
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session, url, body, a.output_len, real, t, stop_at))
                 for _ in range(a.streams)]
        await asyncio.sleep(a.warmup)
        rss: list[tuple[float, int]] = []
        while time.monotonic() < stop_at:
            rss.append((time.monotonic() - started, gateway.memory_info().rss))
            print(f"\r{time.monotonic() - started:5.0f} s: {t.answers} answers, {t.wrong} wrong, {t.errors} errors, "
                  f"gateway {rss[-1][1] / 1e6:.0f} MB", end="", file=sys.stderr, flush=True)
            await asyncio.sleep(2)
        await asyncio.gather(*tasks)  # every client finishes its answer in flight
        elapsed = time.monotonic() - started
        rss.append((elapsed, gateway.memory_info().rss))
    print(file=sys.stderr)
    return {
        "engine": a.engine, "streams": a.streams, "output_len": a.output_len, "duration_s": round(elapsed, 1),
        "answers": t.answers, "tokens": t.tokens, "tokens_per_s": round(t.tokens / elapsed),
        "answers_wrong": t.wrong, "errors": t.errors, "examples": t.examples,
        "gateway_rss_mb": {"after_warmup": round(rss[0][1] / 1e6, 1), "peak": round(max(r for _, r in rss) / 1e6, 1),
                           "end": round(rss[-1][1] / 1e6, 1), "slope_mb_per_min": round(slope_mb_per_min(rss), 2)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["synthetic", "real"], default="synthetic")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=20.0, help="the synthetic engine's step time")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--out", default="benchmarks/results/soak.json")
    p.add_argument("--overload", type=float, default=0.0,
                   help="offer this many times what the box serves, open loop (0: the soak above)")
    p.add_argument("--max-concurrent", type=int, default=64, help="the gateway's MAX_CONCURRENT_REQUESTS (--overload)")
    p.add_argument("--probe-s", type=float, default=60.0, help="how long to measure what the box serves (--overload)")
    a = p.parse_args()

    env = dict(os.environ, LOG_LEVEL="WARNING")
    if a.overload:
        env["MAX_CONCURRENT_REQUESTS"] = str(a.max_concurrent)
    port = free_port()
    procs: list[subprocess.Popen] = []
    if a.engine == "synthetic":
        a.model = "synthetic"
        endpoint = f"ipc://{tempfile.mkdtemp(prefix='vllm-gateway-soak-')}/synthetic"
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"),
                                       "--endpoint", endpoint, "--step-ms", str(a.step_ms)], env=env))
        procs.append(subprocess.Popen([sys.executable, "-m", "vllm_gateway.gateway", "http", "--port", str(port),
                                       "--engine-endpoints", endpoint], env=env, cwd=ROOT))
        gateway = psutil.Process(procs[-1].pid)
    else:
        a.model = "SmolLM2-135M-Instruct"
        # Overload: the engine runs half of what the gateway admits, the rest waits in
        # vLLM's queue, as on a box whose cap is set to keep the engines full.
        seqs = max(1, a.max_concurrent // 2) if a.overload else max(a.streams, 256)
        env.update(DTYPE="float32", ENFORCE_EAGER="1", MAX_NUM_SEQS=str(seqs))
        procs.append(subprocess.Popen([sys.executable, "-m", "vllm_gateway.gateway", "serve", "--port", str(port)], env=env, cwd=ROOT))
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", procs[-1], 900)
        if a.engine == "real":  # the HTTP gateway is the child of `serve` that runs `gateway http`
            gateway = next(c for c in psutil.Process(procs[0].pid).children() if "http" in c.cmdline())
        result = asyncio.run(overload(port, a, gateway) if a.overload else soak(port, a, gateway))
    finally:
        stop(list(reversed(procs)))
    report(result, a.out)


if __name__ == "__main__":
    main()
