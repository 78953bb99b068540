"""Load generator for any OpenAI-compatible endpoint (vllm-gateway, vLLM's own
server, ...): streamed chat or completions at a fixed concurrency or request rate.

    .venv/bin/python benchmarks/load.py --base-url http://127.0.0.1:8000/v1 \\
        --concurrency 32 --num-requests 128 --input-len 128 --output-len 64

Reports request throughput, output tokens/s, TTFT, TPOT and ITL (mean, median,
p99) and failures; writes a JSON file and a PNG plot; shows progress on stderr;
ends by printing one JSON line with the figures. Output lengths are exact: every
request sets `ignore_eos` and reads `usage` from the stream (`include_usage`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact water river mountain light music story garden").split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    index: int = -1  # which of the bodies (results come in the order they end)


def random_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def load_prompts(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [line for line in text.splitlines() if line.strip()]


async def one_request(session: aiohttp.ClientSession, url: str, body: dict, chat: bool) -> Result:
    res = Result(start=time.perf_counter())
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            buf = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if not event.startswith(b"data: "):
                        continue
                    payload = event[6:]
                    if payload == b"[DONE]":
                        continue
                    obj = json.loads(payload)
                    if "error" in obj:
                        res.error = obj["error"].get("message", "error")
                        return res
                    if obj.get("usage"):
                        res.output_tokens = obj["usage"]["completion_tokens"]
                        res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    for c in obj.get("choices", []):
                        text = c["delta"].get("content") if chat else c.get("text")
                        if text:
                            if not res.chunk_times:
                                res.ttft = now - res.start
                            res.chunk_times.append(now)
            res.e2e = time.perf_counter() - res.start
            res.ok = res.output_tokens > 0 or bool(res.chunk_times)
            if not res.ok:
                res.error = "no output"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.chunk_times]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.chunk_times]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out_tokens = sum(r.output_tokens for r in ok)

    def stats(name: str, values: list[float]) -> dict:
        return {f"{name}_mean_s": round(statistics.fmean(values), 5) if values else 0.0,
                f"{name}_median_s": round(pct(values, 0.5), 5), f"{name}_p99_s": round(pct(values, 0.99), 5)}

    return {
        "requests": len(results), "failures": len(results) - len(ok), "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3), "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / duration, 2),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        **stats("ttft", ttft), **stats("tpot", tpot), **stats("itl", itl),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


async def run_load(base_url: str, *, model: str | None = None, endpoint: str = "completions",
                   concurrency: int = 32, rate: float | None = None, num_requests: int = 128,
                   input_len: int = 128, output_len: int = 64, prompts: list[str] | None = None,
                   seed: int = 0, timeout: float = 600, progress: bool = True) -> tuple[dict, list[Result]]:
    """Run the load; returns (summary, per-request results)."""
    chat = endpoint == "chat"
    url = base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        if model is None:
            async with session.get(base_url.rstrip("/") + "/models") as r:
                model = (await r.json())["data"][0]["id"]

        def body(i: int) -> dict:
            prompt = prompts[i % len(prompts)] if prompts else random_prompt(rng, input_len)
            b = {"model": model, "max_tokens": output_len, "stream": True, "ignore_eos": True,
                 "stream_options": {"include_usage": True}, "temperature": 0}
            if chat:
                b["messages"] = [{"role": "user", "content": prompt}]
            else:
                b["prompt"] = prompt
            return b

        bodies = [body(i) for i in range(num_requests)]
        results: list[Result] = []
        sem = asyncio.Semaphore(concurrency if rate is None else num_requests)
        started = time.perf_counter()

        async def worker(i: int) -> None:
            async with sem:
                res = await one_request(session, url, bodies[i], chat)
                res.index = i
                results.append(res)

        async def show() -> None:
            while True:
                await asyncio.sleep(1)
                done = len(results)
                toks = sum(r.output_tokens for r in results)
                print(f"\r{done}/{num_requests} requests, {toks / (time.perf_counter() - started):.0f} output tok/s",
                      end="", file=sys.stderr, flush=True)

        shower = asyncio.create_task(show()) if progress else None
        tasks = []
        for i in range(num_requests):
            tasks.append(asyncio.create_task(worker(i)))
            if rate is not None:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        if shower is not None:
            shower.cancel()
            print(file=sys.stderr)
    summary = summarize(results, duration)
    summary.update(model=model, endpoint=endpoint, concurrency=concurrency, rate=rate,
                   input_len=input_len, output_len=output_len)
    return summary, results


def plot(results: list[Result], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    ok = [r for r in results if r.ok]
    t0 = min((r.start for r in ok), default=0.0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist([r.ttft * 1000 for r in ok], bins=30)
    axes[0].set(title="Time to first token", xlabel="ms", ylabel="requests")
    itl = sorted((b - a) * 1000 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:]))
    axes[1].plot(itl, [i / max(1, len(itl)) for i in range(len(itl))])
    axes[1].set(title="Inter-token latency (CDF)", xlabel="ms", ylabel="fraction")
    if itl:
        axes[1].set_xlim(0, pct(itl, 0.999) * 1.2)  # the rare long gap (a prefill) would flatten the curve
    times = sorted(t - t0 for r in ok for t in r.chunk_times)
    if times:
        width = max(0.5, times[-1] / 60)
        bins = int(times[-1] / width) + 1
        axes[2].hist(times, bins=bins, weights=[1 / width] * len(times))
    axes[2].set(title="Streamed chunks per second", xlabel="s", ylabel="chunks/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=None, help="requests/s (Poisson); instead of a fixed concurrency")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=128, help="words in each random prompt")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request (exact)")
    p.add_argument("--prompts", default=None, help="a file of prompts: one per line, or .jsonl with a 'prompt' key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/load.json")
    p.add_argument("--plot", default="benchmarks/results/load.png")
    a = p.parse_args()
    summary, results = asyncio.run(run_load(
        a.base_url, model=a.model, endpoint=a.endpoint, concurrency=a.concurrency, rate=a.rate,
        num_requests=a.num_requests, input_len=a.input_len, output_len=a.output_len,
        prompts=load_prompts(a.prompts) if a.prompts else None, seed=a.seed))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    if a.plot and plot(results, a.plot, f"{a.base_url} {a.endpoint}, concurrency {a.concurrency}"):
        summary["plot"] = a.plot
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
