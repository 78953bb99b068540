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


async def one_answer(session, url: str, body: bytes, max_tokens: int, real: bool, t: Tally) -> None:
    texts: list[str] = []
    tokens = 0
    finish = None
    usage = None
    done = False
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            t.errors += 1
            await asyncio.sleep(0.5)
            return
        buf = b""
        async for data in r.content.iter_any():
            payloads, buf = sse_payloads(buf + data)
            for payload in payloads:
                if payload == b"[DONE]":
                    done = True
                    continue
                obj = msgspec.json.decode(payload)
                if "error" in obj:
                    t.errors += 1
                    return
                for ch in obj["choices"]:
                    texts.append(ch["text"])
                    if real and ch.get("logprobs"):
                        tokens += len(ch["logprobs"]["tokens"])
                    finish = ch.get("finish_reason") or finish
                usage = obj.get("usage") or usage
    text = "".join(texts)
    got = tokens if real else len(text)
    if not done or finish != "length":
        t.bad(f"ended without [DONE] or finish_reason length ({finish})")
    elif usage is None or usage["completion_tokens"] != max_tokens or got != max_tokens:
        t.bad(f"{got} tokens streamed, usage {usage and usage['completion_tokens']}, asked {max_tokens}")
    elif not real and text != expected_text(max_tokens):
        t.bad(f"text out of order: {text[:40]!r}...")
    t.answers += 1
    t.tokens += got


async def client(session, url, body, max_tokens, real, t: Tally, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        try:
            await one_answer(session, url, body, max_tokens, real, t)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            t.errors += 1
            if len(t.examples) < 5:
                t.examples.append(f"{type(e).__name__}: {e}")


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return 0.0
    xs = [s[0] for s in samples]
    ys = [s[1] / 1e6 for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


async def soak(port: int, a, gateway: psutil.Process) -> dict:
    real = a.engine == "real"
    url = f"http://127.0.0.1:{port}/v1/completions"
    req = {"model": a.model, "prompt": "Tell me a story:", "max_tokens": a.output_len, "stream": True,
           "ignore_eos": True, "stream_options": {"include_usage": True}}
    if real:
        req["logprobs"] = 0
    body = msgspec.json.encode(req)
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
    a = p.parse_args()

    env = dict(os.environ, LOG_LEVEL="WARNING")
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
        env.update(DTYPE="float32", ENFORCE_EAGER="1", MAX_NUM_SEQS=str(max(a.streams, 256)))
        procs.append(subprocess.Popen([sys.executable, "-m", "vllm_gateway.gateway", "serve", "--port", str(port)], env=env, cwd=ROOT))
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", procs[-1], 900)
        if a.engine == "real":  # the HTTP gateway is the child of `serve` that runs `gateway http`
            gateway = next(c for c in psutil.Process(procs[0].pid).children() if "http" in c.cmdline())
        result = asyncio.run(soak(port, a, gateway))
    finally:
        stop(list(reversed(procs)))
    report(result, a.out)


if __name__ == "__main__":
    main()
