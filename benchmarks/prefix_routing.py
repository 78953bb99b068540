"""Prefix-aware routing against least-loaded, two engines on this box.

    .venv/bin/python benchmarks/prefix_routing.py --trials 3

A multi-tenant workload: `--tenants` system prompts of about `--prefix-words`
words each, `--requests-per-tenant` requests per tenant (the tenant's prompt and
a question of its own), in random order, at `--concurrency`. The KV cache of
each engine (`--kv-cache-gib`, VLLM_CPU_KVCACHE_SPACE; 1 GiB holds 23,296
tokens of SmolLM2-135M in float32) holds about half of the tenants' prefixes: both engines together hold them all, one alone does not. A
second workload has no shared prefixes (every prompt its own, as long), where
routing by prefix must do no worse.

Each run starts `vllm-gateway serve` afresh (NUM_ENGINES=2, empty caches) with
ROUTING=prefix or least_loaded, the order alternating between trials. Reported
per run: TTFT, output tokens/s, and vLLM's prefix cache hit rate (hits over
queried prompt tokens, from the engines' counters on /metrics); then the
ratios prefix / least_loaded per trial and their medians. Ends with one JSON line.
Each phase also keeps a timeline (every second: each engine's running and waiting
requests, KV cache use and the routing decisions so far, from /metrics), the
placements over time that the totals hide.

`--compare least_loaded least_loaded` runs one policy against itself (an A/A run):
the spread of its ratios is what this machine's noise alone gives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
import figures  # noqa: E402
from load import random_prompt, run_load  # noqa: E402
from procs import free_port, report, stop, wait_ready  # noqa: E402

AGAIN = "_again"  # the second run's label when both runs of a trial use one policy (`--compare`)


def cache_counters(base: str) -> tuple[float, float]:
    """vLLM's prefix cache queries and hits (tokens), summed over the engines."""
    text = httpx.get(base + "/metrics", timeout=10).text
    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in totals:
                totals[s.name] += s.value
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]


def engine_sample(base: str) -> dict[str, dict[str, float]]:
    """Each engine's load and the routing decisions that chose it, now."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    names = {"vllm_gateway:engine_requests_running": "running", "vllm_gateway:engine_requests_waiting": "waiting",
             "vllm_gateway:engine_kv_cache_usage_perc": "kv"}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            engine = s.labels.get("engine")
            if s.name in names and engine:
                out.setdefault(engine, {})[names[s.name]] = s.value
            elif s.name == "vllm_gateway:routing_decisions_total" and engine:
                out.setdefault(engine, {})["routed_" + s.labels["reason"]] = s.value
    return out


class Timeline(threading.Thread):
    """Samples every engine's load and placements once a second while a phase runs."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.samples, self.done = base, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                self.samples.append({"t": round(time.monotonic() - self.t0, 1), "engines": engine_sample(self.base)})
            except httpx.HTTPError:
                pass

    def stop(self) -> list[dict]:
        self.done.set()
        self.join()
        return self.samples


def wait_all_ready(base: str, timeout: float = 900) -> None:
    """/health answers 200 once one engine is ready; a run starts when both are,
    or its first requests all go to the first engine up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engines = httpx.get(base + "/health", timeout=10).json()["engines"]
        if engines and all(e["ready"] for e in engines):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the engines at {base} were not all ready after {timeout:.0f} s")


def workloads(a: argparse.Namespace, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    tenants = [f"Tenant {t}. " + random_prompt(rng, a.prefix_words) for t in range(a.tenants)]
    shared = [f"{tenants[t]}\nQuestion {i}: {random_prompt(rng, a.question_words)}"
              for t in range(a.tenants) for i in range(a.requests_per_tenant)]
    rng.shuffle(shared)
    unshared = [f"Request {i}. " + random_prompt(rng, a.prefix_words + a.question_words)
                for i in range(a.unshared_requests)]
    return {"shared_prefixes": shared, "no_shared_prefixes": unshared}


def ttft_by_kind(prompts: list[str], results: list) -> dict[str, dict]:
    """TTFT of each tenant's first request (sent while no engine holds its prefix:
    a miss under either policy) apart from the rest (a hit where the tenant's
    prefix is cached: under prefix routing, all of them), with how many took over
    a second: what a hit costs when it shares an engine's steps with a miss."""
    seen: set[str] = set()
    kind = []
    for p in prompts:
        head = p.split("\n", 1)[0]
        kind.append("repeat" if head in seen else "first")
        seen.add(head)
    out = {}
    for k in ("first", "repeat"):
        ttfts = sorted(r.ttft for r in results if r.ok and 0 <= r.index < len(kind) and kind[r.index] == k)
        if ttfts:
            out[k] = {"n": len(ttfts), "p50_s": round(statistics.median(ttfts), 3),
                      "over_1s": sum(t > 1.0 for t in ttfts)}
    return out


def balance(timeline: list[dict]) -> dict:
    """From a phase's timeline: the seconds sampled with both engines reporting, and
    those in which one had nothing to do while the other had requests."""
    seconds = idle = 0
    for sample in timeline:
        engines = sample["engines"].values()
        if len(engines) < 2:
            continue
        seconds += 1
        loads = [e.get("running", 0) + e.get("waiting", 0) for e in engines]
        idle += min(loads) == 0 < max(loads)
    return {"seconds": seconds, "one_engine_idle": idle}


def run(label: str, a: argparse.Namespace, loads: dict[str, list[str]]) -> dict:
    policy = label.removesuffix(AGAIN)
    port = free_port()
    env = dict(os.environ, NUM_ENGINES="2", ROUTING=policy, VLLM_CPU_KVCACHE_SPACE=str(a.kv_cache_gib),
               MAX_MODEL_LEN=str(a.max_model_len), LOG_LEVEL="WARNING", ENABLE_PREFIX_CACHING="1")
    if a.model:
        env["MODEL_NAME"] = a.model
    if a.max_num_batched_tokens:
        env["MAX_NUM_BATCHED_TOKENS"] = str(a.max_num_batched_tokens)
    print(f"== {label}: starting", file=sys.stderr)
    proc = subprocess.Popen([sys.executable, "-m", "vllm_gateway.gateway", "serve", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        wait_ready(base + "/health", proc)
        wait_all_ready(base)
        for name, prompts in loads.items():
            q0, h0 = cache_counters(base)
            timeline = Timeline(base)
            timeline.start()
            summary, results = asyncio.run(run_load(base + "/v1", concurrency=a.concurrency,
                                                    num_requests=len(prompts), output_len=a.output_len,
                                                    prompts=prompts, progress=False))
            summary["timeline"] = timeline.stop()
            summary["ttft_by_kind"] = ttft_by_kind(prompts, results)
            summary["balance"] = balance(summary["timeline"])
            time.sleep(1.5)  # the engines report their counters once a second
            q1, h1 = cache_counters(base)
            summary["prefix_cache_hit_rate"] = round((h1 - h0) / (q1 - q0), 3) if q1 > q0 else 0.0
            print(f"== {label} / {name}: {summary['output_tokens_per_s']} output tok/s, TTFT p50 "
                  f"{summary['ttft_median_s']} s, prefix cache hit rate {summary['prefix_cache_hit_rate']}, "
                  f"failures {summary['failures']}", file=sys.stderr)
            out[name] = {k: summary[k] for k in ("requests", "failures", "duration_s", "output_tokens_per_s",
                                                 "ttft_median_s", "ttft_p99_s", "itl_median_s", "prompt_tokens",
                                                 "prefix_cache_hit_rate", "ttft_by_kind", "balance", "timeline")}
            kinds = summary["ttft_by_kind"]
            print(f"== {label} / {name}: TTFT by kind " + ", ".join(
                f"{k}: n={v['n']} p50 {v['p50_s']} s, {v['over_1s']} over 1 s" for k, v in kinds.items())
                  + f"; one engine idle in {summary['balance']['one_engine_idle']} of {summary['balance']['seconds']} s",
                  file=sys.stderr)
    finally:
        stop([proc], timeout=120)
        time.sleep(3)  # let the engines' vLLM processes go
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MODEL_NAME"), help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--tenants", type=int, default=14)
    p.add_argument("--prefix-words", type=int, default=2800, help="about as many tokens, plus a few")
    p.add_argument("--question-words", type=int, default=24)
    p.add_argument("--requests-per-tenant", type=int, default=6)
    p.add_argument("--unshared-requests", type=int, default=24, help="the workload without shared prefixes")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="per engine; SmolLM2-135M in float32: ~23,000 tokens")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="vLLM's token budget per step (0: its default, 2048 on CPU): how long a miss's prefill holds a step")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--compare", nargs=2, default=["prefix", "least_loaded"], metavar=("POLICY", "BASELINE"),
                   help="the two policies, the ratios first over second; the same one twice is an A/A run: "
                        "what the ratios spread when nothing differs")
    p.add_argument("--out", default="benchmarks/results/prefix_routing.json")
    a = p.parse_args()

    first, second = a.compare
    if first == second:
        second += AGAIN
    ratios_key = f"ratios_{first}_over_{second}"
    trials = []
    for i in range(a.trials):
        loads = workloads(a, seed=i)
        order = [first, second] if i % 2 == 0 else [second, first]
        runs = {label: run(label, a, loads) for label in order}
        ratios = {}
        for name in loads:
            pr, ll = runs[first][name], runs[second][name]
            ratios[name] = {
                "ttft_p50_speedup": round(ll["ttft_median_s"] / pr["ttft_median_s"], 3) if pr["ttft_median_s"] else 0.0,
                "output_tokens_per_s": round(pr["output_tokens_per_s"] / ll["output_tokens_per_s"], 3)
                if ll["output_tokens_per_s"] else 0.0,
            }
        trials.append({"order": order, "runs": runs, ratios_key: ratios})
        print(f"== trial {i + 1}: {json.dumps(ratios)}", file=sys.stderr)
    medians = {
        name: {k: statistics.median(t[ratios_key][name][k] for t in trials) for k in trials[0][ratios_key][name]}
        for name in trials[0][ratios_key]
    }
    results = {"trials": trials, f"median_{ratios_key}": medians,
               "settings": {k: v for k, v in vars(a).items() if k != "out"}, "stamp": figures.stamp()}
    report(results, a.out)
    if (first, second) == ("prefix", "least_loaded"):
        figures.prefix_routing(results, str(Path(a.out).with_suffix(".png")))


if __name__ == "__main__":
    main()
