"""Figures of the benchmarks' results, readable at a glance: both contenders on
the same axes, each trial's ratio with the median of the trials, and the commit
and the machine printed on the figure (a figure without them cannot be compared
with another).

Each benchmark calls these at its end; `python benchmarks/figures.py RESULT.json`
draws a saved result again.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stamp() -> str:
    """The commit (and whether the tree had local changes) and the machine."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Local changes to what runs (not to the README or these figures).
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "gateway", "engine",
                                "protocol", "benchmarks/*_engine.py", "setup.cfg"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += " + local changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"commit {commit} · {cpu}, {os.cpu_count()} cores, {'GPUs ' + gpus if gpus else 'no GPU'} · "
            f"{time.strftime('%Y-%m-%d')}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _save(plt, fig, path: str, title: str, bottom: float, stamped: str | None = None) -> bool:
    """Title, the stamp along the bottom (the one the results were measured
    under, when they carry it), and the file."""
    fig.suptitle(title)
    fig.text(0.5, 0.005, stamped or stamp(), ha="center", va="bottom", fontsize="small", color="dimgray")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


Metric = tuple[str, Callable[[dict], float], str]  # label, value of one contender's run, unit


Row = tuple[Metric, Sequence[tuple[dict, dict]]]  # a metric, and each trial's (first, second) runs


def trials_figure(path: str, title: str, names: tuple[str, str], rows: Sequence[Row], ratio_label: str,
                  stamped: str | None = None) -> bool:
    """One row per metric: left, both contenders' values trial by trial on the same
    axes; right, each trial's ratio (second / first) and the median of the trials."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.6 * len(rows) + 0.8), squeeze=False)
    for row, ((label, value, unit), trials) in enumerate(rows):
        x = list(range(1, len(trials) + 1))
        a = [value(t[0]) for t in trials]
        b = [value(t[1]) for t in trials]
        left, right = axes[row]
        left.plot(x, a, "o-", label=names[0], color="tab:gray")
        left.plot(x, b, "s-", label=names[1], color="tab:blue")
        left.set(title=label, xlabel="trial", ylabel=unit, xticks=x)
        left.set_ylim(bottom=0)
        left.legend(loc="lower right", fontsize="small")
        ratios = [vb / va if va else 0.0 for va, vb in zip(a, b)]
        median = statistics.median(ratios)
        right.bar(x, ratios, color="tab:blue", alpha=0.7)
        right.axhline(1.0, color="black", linewidth=0.8)
        right.axhline(median, color="tab:red", linestyle="--", label=f"median {median:.3f}")
        for xi, r in zip(x, ratios):
            right.annotate(f"{r:.3f}", (xi, r), ha="center", va="bottom", fontsize="small")
        right.set(title=f"ratio {ratio_label}", xlabel="trial", ylabel="ratio", xticks=x)
        right.legend(loc="lower right", fontsize="small")
    return _save(plt, fig, path, title, bottom=0.03, stamped=stamped)


def side_by_side(results: dict, path: str) -> bool:
    s = results["settings"]
    trials = [(t["vllm"], t["vllm_gateway"]) for t in results["trials"]]
    metrics: list[Metric] = [
        ("output tokens/s", lambda r: r["output_tokens_per_s"], "tokens/s"),
        ("time to first token, p50 (lower is better)", lambda r: r["ttft_median_s"], "s"),
        ("inter-token latency, p50 (lower is better)", lambda r: r["itl_median_s"] * 1000, "ms"),
        ("front-end CPU per output token (lower is better)",
         lambda r: r["front_end_cpu_ms_per_output_token"] * 1000, "µs"),
    ]
    model = "tiny random-weight SmolLM2" if s.get("tiny_model") else "SmolLM2-135M-Instruct"
    title = (f"vllm-gateway vs vLLM's own server: {model}, {s['num_requests']} streams of {s['output_len']} tokens, "
             f"{s['concurrency']} at a time (orders alternate)")
    return trials_figure(path, title, ("vLLM api_server", "vllm-gateway serve"), [(m, trials) for m in metrics],
                         "vllm-gateway / vLLM", results.get("stamp"))


def prefix_routing(results: dict, path: str) -> bool:
    s = results["settings"]
    trials = [(t["runs"]["least_loaded"]["shared_prefixes"], t["runs"]["prefix"]["shared_prefixes"])
              for t in results["trials"]]
    metrics: list[Metric] = [
        ("shared prefixes: time to first token, p50 (lower is better)", lambda r: r["ttft_median_s"], "s"),
        ("shared prefixes: output tokens/s", lambda r: r["output_tokens_per_s"], "tokens/s"),
        ("shared prefixes: vLLM prefix cache hit rate", lambda r: r["prefix_cache_hit_rate"], "share of prompt tokens"),
    ]
    unshared = [(t["runs"]["least_loaded"]["no_shared_prefixes"], t["runs"]["prefix"]["no_shared_prefixes"])
                for t in results["trials"]]
    metrics_unshared: list[Metric] = [
        ("no shared prefixes: output tokens/s", lambda r: r["output_tokens_per_s"], "tokens/s"),
    ]
    title = (f"ROUTING=prefix vs least_loaded: 2 engines, {s['tenants']} tenants x {s['requests_per_tenant']} requests "
             f"(~{s['prefix_words']}-token prefixes), {s['concurrency']} at a time")
    rows = [(m, trials) for m in metrics] + [(m, unshared) for m in metrics_unshared]
    return trials_figure(path, title, ("least_loaded", "prefix"), rows, "prefix / least_loaded", results.get("stamp"))


def gateway_capacity(points: Sequence[dict], path: str, stamped: str | None = None) -> bool:
    """A sweep over the number of concurrent streams: what one gateway process
    streams, at what CPU cost per token, and the first-token latency it adds."""
    plt = _pyplot()
    if plt is None or not points:
        return False
    points = sorted(points, key=lambda p: p["streams"])
    x = [p["streams"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].plot(x, [p["offered_tokens_per_s"] for p in points], "o--", color="tab:gray", label="offered by the engine")
    axes[0].plot(x, [p["streamed_tokens_per_s"] for p in points], "s-", color="tab:blue", label="streamed to clients")
    axes[0].set(title="tokens/s through one gateway", xlabel="concurrent streams", ylabel="tokens/s")
    axes[0].legend(fontsize="small")
    axes[1].plot(x, [p["gateway_cpu_us_per_token"] for p in points], "s-", color="tab:blue")
    axes[1].set(title="gateway CPU per streamed token", xlabel="concurrent streams", ylabel="µs")
    axes[2].plot(x, [p["ttft_p50_ms"] for p in points], "s-", color="tab:blue", label="p50")
    axes[2].plot(x, [p["ttft_p99_ms"] for p in points], "^-", color="tab:orange", label="p99")
    axes[2].set(title="time to first token (engine answers in one step)", xlabel="concurrent streams", ylabel="ms")
    axes[2].legend(fontsize="small")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylim(bottom=0)
    lost = sum(p["tokens_lost"] for p in points)
    errors = sum(p["errors"] for p in points)
    step = points[0]["step_ms"]
    return _save(plt, fig, path, f"One gateway process in front of a synthetic engine (a step every {step:g} ms): "
                 f"{lost} tokens lost, {errors} requests failed", bottom=0.04, stamped=stamped)


def main() -> None:
    for name in sys.argv[1:]:
        results = json.loads(Path(name).read_text())
        out = str(Path(name).with_suffix(".png"))
        if "points" in results:
            gateway_capacity(results["points"], out, results.get("stamp"))
        elif "median_ratios_prefix_over_least_loaded" in results:
            prefix_routing(results, out)
        else:
            side_by_side(results, out)
        print(out)


if __name__ == "__main__":
    main()
