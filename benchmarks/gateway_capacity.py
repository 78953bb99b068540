"""Capacity of one gateway process, measured alone: the real HTTP gateway in front of
`synthetic_engine.py` (a load generator speaking the real protocol, no model), with
many concurrent streaming clients.

    .venv/bin/python benchmarks/gateway_capacity.py --streams 512 --duration 30

Reports the sustained streamed tokens/s and requests/s, the gateway's CPU time per
streamed token (from the gateway process's own CPU accounting, so the figure holds
while the clients share the cores), the latency it adds (time to first token,
which the synthetic engine answers within one step), its resident memory, and
whether any token was lost (every request's streamed text is checked against its
`usage`). Ends by printing one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import psutil

ROOT = Path(__file__).resolve().parent.parent
import figures  # noqa: E402
from load import pct  # noqa: E402
from procs import free_port, report, sse_payloads, stop, wait_ready  # noqa: E402


class Counters:
    def __init__(self) -> None:
        self.tokens = 0
        self.requests = 0
        self.lost = 0
        self.errors = 0
        self.ttft: list[float] = []
        self.recording = False


async def stream_forever(session, url: str, body: bytes, c: Counters, stop_at: float) -> None:
    decode = msgspec.json.decode
    while time.monotonic() < stop_at:
        start = time.monotonic()
        got = 0
        reported = -1
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    c.errors += 1
                    await asyncio.sleep(0.1)
                    continue
                buf = b""
                async for data in r.content.iter_any():
                    payloads, buf = sse_payloads(buf + data)
                    for payload in payloads:
                        if payload == b"[DONE]":
                            continue
                        obj = decode(payload)
                        for ch in obj["choices"]:
                            n = len(ch["text"])
                            if n and got == 0 and c.recording:
                                c.ttft.append(time.monotonic() - start)
                            got += n
                            if c.recording:
                                c.tokens += n
                        if obj.get("usage"):
                            reported = obj["usage"]["completion_tokens"]
        except (aiohttp.ClientError, asyncio.TimeoutError):
            c.errors += 1
            continue
        if reported != got:
            c.lost += abs(reported - got)
        if c.recording:
            c.requests += 1


async def drive(port: int, streams: int, output_len: int, warmup: float, duration: float, gw: psutil.Process) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = msgspec.json.encode({"model": "synthetic", "prompt": "hi", "max_tokens": output_len, "stream": True,
                                "stream_options": {"include_usage": True}})
    c = Counters()
    stop_at = time.monotonic() + warmup + duration + 60
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        workers = [asyncio.create_task(stream_forever(session, url, body, c, stop_at)) for _ in range(streams)]
        await asyncio.sleep(warmup)
        cpu0 = sum(gw.cpu_times()[:2])
        t0 = time.monotonic()
        c.recording = True
        rss = 0
        while time.monotonic() - t0 < duration:
            await asyncio.sleep(1)
            rss = max(rss, gw.memory_info().rss)
            print(f"\r{time.monotonic() - t0:4.0f} s: {c.tokens / (time.monotonic() - t0):8.0f} tok/s streamed",
                  end="", file=sys.stderr, flush=True)
        c.recording = False
        elapsed = time.monotonic() - t0
        cpu = sum(gw.cpu_times()[:2]) - cpu0
        print(file=sys.stderr)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return {
        "streams": streams, "output_len": output_len, "duration_s": round(elapsed, 2),
        "streamed_tokens_per_s": round(c.tokens / elapsed), "requests_per_s": round(c.requests / elapsed, 1),
        "gateway_cpu_us_per_token": round(cpu / max(1, c.tokens) * 1e6, 2),
        "gateway_cpu_utilization": round(cpu / elapsed, 3),
        "ttft_p50_ms": round(pct(c.ttft, 0.5) * 1000, 1), "ttft_p99_ms": round(pct(c.ttft, 0.99) * 1000, 1),
        "gateway_rss_mb": round(rss / 1e6, 1), "tokens_lost": c.lost, "errors": c.errors,  # not a 200, or a broken stream
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="512", help="concurrent streams; a comma-separated list sweeps them "
                   "(each point on a fresh gateway) and draws the curve")
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--step-ms", type=float, default=10.0, help="the synthetic engine's step time")
    p.add_argument("--tokens-per-step", type=int, default=1)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--out", default="benchmarks/results/gateway_capacity.json")
    a = p.parse_args()
    counts = [int(n) for n in a.streams.split(",")]
    points = [measure(a, n) for n in counts]
    if len(points) == 1:
        report(points[0], a.out)
        return
    results = {"points": points, "stamp": figures.stamp()}
    report(results, a.out)
    figures.gateway_capacity(points, str(Path(a.out).with_suffix(".png")), results["stamp"])


def measure(a: argparse.Namespace, streams: int) -> dict:
    """One point: a fresh synthetic engine and gateway, `streams` clients."""
    run_dir = tempfile.mkdtemp(prefix="vllm-gateway-bench-")
    endpoint = f"ipc://{run_dir}/synthetic"
    port = free_port()
    # No request cap: this measures what the gateway carries, not what it sheds
    # (at the default cap, 512 per engine, a client that asks again the moment
    # its stream ends can beat the slot's release and get a 429).
    env = dict(os.environ, LOG_LEVEL="WARNING", MAX_CONCURRENT_REQUESTS="0")
    engine = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"), "--endpoint", endpoint,
                               "--step-ms", str(a.step_ms), "--tokens-per-step", str(a.tokens_per_step)], env=env)
    gateway = subprocess.Popen([sys.executable, "-m", "vllm_gateway.gateway", "http", "--port", str(port),
                                "--engine-endpoints", endpoint], env=env, cwd=ROOT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", gateway, 60)
        result = asyncio.run(drive(port, streams, a.output_len, a.warmup, a.duration, psutil.Process(gateway.pid)))
        result.update(step_ms=a.step_ms, tokens_per_step=a.tokens_per_step,
                      offered_tokens_per_s=round(streams * a.tokens_per_step / (a.step_ms / 1000)))
    finally:
        stop([gateway, engine], timeout=10)
    print(f"== {streams} streams: {result['streamed_tokens_per_s']} tok/s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
