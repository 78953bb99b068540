"""vLLM's own OpenAI server and `vllm-gateway serve`, one after the other, on the same
model, dtype, engine settings and load; prints the ratios (ours / vLLM).

    .venv/bin/python benchmarks/side_by_side.py --concurrency 32 --num-requests 128 --trials 3

Both run the same vLLM engine build; what differs is everything in front of the
engine core: vLLM's FastAPI server, or our gateway process plus our engine adapter
(which holds AsyncLLM, the tokenizer and detokenizer). Reported per run: the load
figures (benchmarks/load.py), and the CPU seconds of the front-end processes and
of the engine core. With `--trials N` the pair runs N times, the order
alternating (vLLM first, then ours first, ...) so that neither server always
gets the warmer machine; the ratios are given per trial and as their median.
Ends by printing one JSON line with the figures and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
import figures  # noqa: E402
from load import plot, run_load  # noqa: E402
from procs import free_port, wait_ready  # noqa: E402


def cpu_by_role(root: psutil.Process, classify) -> dict[str, float]:
    """CPU seconds (user + system) of every process in the tree, summed by role."""
    out: dict[str, float] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            role = classify(p)
            t = p.cpu_times()
            out[role] = out.get(role, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def vllm_role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    return "front_end" if "api_server" in cmd else "engine_core"


def ours_role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "gateway http" in cmd:
        return "front_end_gateway"
    if "-m vllm_gateway.engine" in cmd:
        return "front_end_engine_adapter"
    if "gateway serve" in cmd:
        return "launcher"
    return "engine_core"


def measure(name: str, cmd: list[str], env: dict, base: str, classify, load_args: dict, plot_path: str) -> dict:
    print(f"== {name}: starting", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base + "/v1/models", proc)
        root = psutil.Process(proc.pid)
        asyncio.run(run_load(base + "/v1", **{**load_args, "num_requests": 8, "progress": False}))  # warm up
        before = cpu_by_role(root, classify)
        summary, results = asyncio.run(run_load(base + "/v1", **load_args))
        after = cpu_by_role(root, classify)
        summary["cpu_s"] = {k: round(after.get(k, 0) - before.get(k, 0), 2) for k in after}
        front = sum(v for k, v in summary["cpu_s"].items() if k.startswith("front_end"))
        summary["front_end_cpu_s"] = round(front, 2)
        summary["front_end_cpu_ms_per_output_token"] = round(front / max(1, summary["output_tokens"]) * 1000, 3)
        plot(results, plot_path, f"{name}: concurrency {load_args['concurrency']}")
        print(f"== {name}: {summary['output_tokens_per_s']} output tok/s", file=sys.stderr)
        return summary
    finally:
        proc.send_signal(signal.SIGINT if name == "vllm" else signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(3)  # let the engine core processes go


def ratios(o: dict, v: dict) -> dict[str, float]:
    def ratio(key: str) -> float:
        return round(o[key] / v[key], 3) if v[key] else 0.0

    return {
        "output_tokens_per_s": ratio("output_tokens_per_s"),
        "ttft_p50": ratio("ttft_median_s"), "ttft_p99": ratio("ttft_p99_s"),
        "itl_p50": ratio("itl_median_s"), "itl_p99": ratio("itl_p99_s"),
        "front_end_cpu": ratio("front_end_cpu_s"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MODEL_NAME"), help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE on CPU")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--trials", type=int, default=1, help="runs of the pair, order alternating; ratios: the median")
    p.add_argument("--out", default="benchmarks/results/side_by_side.json")
    p.add_argument("--tiny-model", action="store_true",
                   help="SmolLM2's config cut to 1 layer, hidden size 64, random weights (LOAD_FORMAT=dummy): "
                        "the front ends' cost, not the model's (benchmarks/tiny_model.py)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's, for both servers")
    p.add_argument("--only", choices=["vllm", "ours"], help="run one server alone (no ratios): for profiling")
    a = p.parse_args()

    model = a.model
    if a.tiny_model:
        from tiny_model import build

        model = str(build(ROOT / "benchmarks" / "results" / "tiny-smollm2"))
    if model is None:
        from vllm_gateway.engine import default_model

        model = str(default_model.ensure())
    served = "bench-model"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=a.kv_cache_gib)
    load_args = dict(model=served, endpoint=a.endpoint, concurrency=a.concurrency, num_requests=a.num_requests,
                     input_len=a.input_len, output_len=a.output_len)
    vllm_cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", served,
        "--dtype", a.dtype, "--enforce-eager", "--max-model-len", str(a.max_model_len),
        "--host", "127.0.0.1",  # stats and /metrics on, as vLLM runs by default
    ]
    ours_env = dict(env, MODEL_NAME=model, OPENAI_SERVED_MODEL_NAME_OVERRIDE=served, DTYPE=a.dtype,
                    ENFORCE_EAGER="1", MAX_MODEL_LEN=str(a.max_model_len), LOG_LEVEL="WARNING")
    if a.tiny_model:
        vllm_cmd += ["--load-format", "dummy"]
        ours_env["LOAD_FORMAT"] = "dummy"
    if a.max_num_seqs is not None:
        vllm_cmd += ["--max-num-seqs", str(a.max_num_seqs)]
        ours_env["MAX_NUM_SEQS"] = str(a.max_num_seqs)

    def run_vllm() -> dict:
        port = free_port()
        return measure("vllm", vllm_cmd + ["--port", str(port)], env, f"http://127.0.0.1:{port}", vllm_role,
                       load_args, "benchmarks/results/side_by_side_vllm.png")

    def run_ours() -> dict:
        port = free_port()
        return measure("vllm-gateway", [sys.executable, "-m", "vllm_gateway.gateway", "serve", "--port", str(port)], ours_env,
                       f"http://127.0.0.1:{port}", ours_role, load_args,
                       "benchmarks/results/side_by_side_vllm_gateway.png")

    if a.only:
        print(json.dumps(run_vllm() if a.only == "vllm" else run_ours()))
        return
    trials = []
    for i in range(a.trials):
        if i % 2 == 0:
            v, o = run_vllm(), run_ours()
        else:
            o, v = run_ours(), run_vllm()
        trial = {"order": "vllm first" if i % 2 == 0 else "ours first", "vllm": v, "vllm_gateway": o,
                 "ratios_ours_over_vllm": ratios(o, v)}
        trials.append(trial)
        print(f"== trial {i + 1}: {json.dumps(trial['ratios_ours_over_vllm'])}", file=sys.stderr)
    keys = trials[0]["ratios_ours_over_vllm"].keys()
    results: dict = {
        "trials": trials,
        "ratios_ours_over_vllm": {k: statistics.median(t["ratios_ours_over_vllm"][k] for t in trials) for k in keys},
    }
    results["stamp"] = figures.stamp()
    results["settings"] = {**load_args, "model_path": model, "tiny_model": a.tiny_model, "max_num_seqs": a.max_num_seqs,
                           "dtype": a.dtype, "max_model_len": a.max_model_len}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    figures.side_by_side(results, str(Path(a.out).with_suffix(".png")))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
