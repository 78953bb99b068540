"""Engine settings: environment variables of RunPod's worker-vllm, CLI flags on top.

Each `Setting` maps one environment variable to one vLLM engine argument. The
CLI flag of a setting is its variable's name in kebab case (`MAX_MODEL_LEN` ->
`--max-model-len`); a flag given on the command line beats the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("engine.args")


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r} (use 0 or 1)")


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    engine_arg: str | None  # None: used by this package, not passed to vLLM
    parse: Callable[[str], Any] = str
    help: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("MODEL_NAME", "model", help="Hugging Face repo or local path; unset: the embedded SmolLM2-135M-Instruct", aliases=("--model",)),
    Setting("MODEL_REVISION", "revision"),
    Setting("MAX_MODEL_LEN", "max_model_len", int),
    Setting("BASE_PATH", None, help="cache directory for Hugging Face downloads and converted models"),
    Setting("LOAD_FORMAT", "load_format"),
    Setting("HF_TOKEN", "hf_token", help="token for gated models (never logged)"),
    Setting("QUANTIZATION", "quantization"),
    Setting("TRUST_REMOTE_CODE", "trust_remote_code", parse_bool),
    Setting("SEED", "seed", int),
    Setting("KV_CACHE_DTYPE", "kv_cache_dtype"),
    Setting("DTYPE", "dtype"),
    Setting("TOKENIZER_NAME", "tokenizer", aliases=("--tokenizer",)),
    Setting("TOKENIZER_REVISION", "tokenizer_revision"),
    Setting("CUSTOM_CHAT_TEMPLATE", None, help="Jinja chat template replacing the model's"),
    Setting("GPU_MEMORY_UTILIZATION", "gpu_memory_utilization", float),
    Setting("MAX_PARALLEL_LOADING_WORKERS", "max_parallel_loading_workers", int),
    Setting("BLOCK_SIZE", "block_size", int),
    Setting("SWAP_SPACE", "swap_space", float),
    Setting("ENFORCE_EAGER", "enforce_eager", parse_bool),
    Setting("MAX_CONTEXT_LEN_TO_CAPTURE", "max_context_len_to_capture", int),
    Setting("DISABLE_CUSTOM_ALL_REDUCE", "disable_custom_all_reduce", parse_bool),
    Setting("TENSOR_PARALLEL_SIZE", "tensor_parallel_size", int),
    Setting("PIPELINE_PARALLEL_SIZE", "pipeline_parallel_size", int),
    Setting("DISTRIBUTED_EXECUTOR_BACKEND", "distributed_executor_backend"),
    Setting("MAX_NUM_SEQS", "max_num_seqs", int),
    Setting("MAX_NUM_BATCHED_TOKENS", "max_num_batched_tokens", int),
    Setting("ENABLE_PREFIX_CACHING", "enable_prefix_caching", parse_bool),
    Setting("DISABLE_LOG_STATS", None, parse_bool, help="default 1"),
    Setting("DISABLE_LOG_REQUESTS", None, parse_bool, help="default 1"),
    Setting("OPENAI_SERVED_MODEL_NAME_OVERRIDE", None, help="model name clients use"),
)


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine settings (each also read from its environment variable)")
    for s in SETTINGS:
        group.add_argument(s.flag, *s.aliases, dest=s.env, default=None, metavar=s.env, help=s.help or None)


def collect(env: Mapping[str, str], cli: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Raw settings by variable name: environment first, then CLI flags over it.

    A value that does not parse raises ValueError naming the variable."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        raw = (cli or {}).get(s.env)
        if raw is None:
            raw = env.get(s.env)
        if raw is None or raw == "":
            continue
        try:
            out[s.env] = s.parse(raw)
        except ValueError as e:
            raise ValueError(f"{s.env}={raw!r}: {e}") from None
    return out


def engine_kwargs(settings: Mapping[str, Any], supported: set[str]) -> dict[str, Any]:
    """The vLLM engine arguments for these settings.

    `supported` is the set of argument names the installed vLLM knows; a setting
    whose argument it no longer has is logged once and left out, not fatal."""
    kwargs: dict[str, Any] = {}
    for s in SETTINGS:
        if s.engine_arg is None or s.env not in settings:
            continue
        if s.engine_arg not in supported:
            log.warning("%s is set but the installed vLLM has no '%s' argument; ignoring it", s.env, s.engine_arg)
            continue
        kwargs[s.engine_arg] = settings[s.env]
    kwargs["disable_log_stats"] = settings.get("DISABLE_LOG_STATS", True)
    if "enable_log_requests" in supported:
        kwargs["enable_log_requests"] = not settings.get("DISABLE_LOG_REQUESTS", True)
    if "BASE_PATH" in settings and "download_dir" in supported:
        kwargs["download_dir"] = os.path.join(settings["BASE_PATH"], "huggingface-cache", "hub")
    return kwargs


def redacted(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """For logging: never print a token."""
    return {k: ("***" if "token" in k else v) for k, v in kwargs.items()}


def apply_platform_defaults(
    settings: dict[str, Any], env: dict[str, str], *, on_gpu: bool, cpu_has_bf16: bool
) -> list[str]:
    """Fill in the defaults that depend on the hardware (in `settings`, and in
    `env` for vLLM's own variables); returns what was chosen.

    On a CPU: eager mode (torch.compile adds ~2 minutes to every cold start for a
    small model) and, without AVX-512 BF16, float32 (bfloat16 is emulated there
    and measured 4.8x slower)."""
    chosen: list[str] = []
    if on_gpu:
        return chosen
    if "ENFORCE_EAGER" not in settings:
        settings["ENFORCE_EAGER"] = True
        chosen.append("ENFORCE_EAGER=1 (CPU)")
    if "GPU_MEMORY_UTILIZATION" not in settings and "VLLM_CPU_KVCACHE_SPACE" not in env:
        # On CPU vLLM reads GPU_MEMORY_UTILIZATION as a share of the whole NUMA
        # node's memory (0.92 by default) and refuses to start if that much is not
        # free; a fixed KV cache is the predictable choice.
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        chosen.append("VLLM_CPU_KVCACHE_SPACE=2 GiB (CPU)")
    if "DTYPE" not in settings and not cpu_has_bf16:
        settings["DTYPE"] = "float32"
        chosen.append("DTYPE=float32 (CPU without AVX-512 BF16)")
    return chosen
