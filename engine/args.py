"""Engine settings: environment variables, CLI flags on top.

Two sources, as worker-vllm and `vllm serve` name them:
- `SETTINGS`: worker-vllm's documented variables (some with names of their own,
  `MODEL_NAME` -> `--model`) and this engine's chat options; each is also a CLI
  flag, its variable's name in kebab case (`MAX_MODEL_LEN` -> `--max-model-len`).
- every other vLLM engine argument, as its upper-snake-case variable
  (`--max-num-batched-tokens` <- `MAX_NUM_BATCHED_TOKENS`), plus raw flags in
  `VLLM_EXTRA_ARGS` and on the command line. These are parsed by vLLM's own
  argument parser (`vllm_args`), so their types, JSON configs and choices are
  vLLM's; a value it refuses names its variable.
A flag given on the command line beats the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
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


def _json_object(value: str) -> dict:
    obj = json.loads(value)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def parse_lora_modules(value: str) -> list[dict[str, str]]:
    """`LORA_MODULES` in the forms worker-vllm and `vllm serve` take: `name=path`
    pairs (spaces or commas between them), JSON objects with `name`, `path` and
    optionally `base_model_name` (one, a list, or one per line)."""
    value = value.strip()
    if not value:
        return []
    if value[0] in "[{":
        try:
            obj = json.loads(value)
            items = obj if isinstance(obj, list) else [obj]
        except ValueError:  # one JSON object per line
            items = [json.loads(line) for line in value.splitlines() if line.strip()]
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(
                    item.get("path"), str):
                raise ValueError(f"each LoRA module needs a name and a path: {item!r}")
        return items
    out = []
    for pair in value.replace(",", " ").split():
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"expected name=path, got {pair!r}")
        out.append({"name": name, "path": path})
    return out


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    engine_arg: str | None  # None: used by this package, not passed to vLLM
    parse: Callable[[str], Any] = str
    help: str = ""
    aliases: tuple[str, ...] = ()  # more flags
    also: tuple[str, ...] = ()  # more variables (read when the main one is unset)

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
    Setting("TOKENIZER_NAME", "tokenizer", aliases=("--tokenizer",), also=("TOKENIZER",),
            help="tokenizer repo or path, when not the model's (worker-vllm's TOKENIZER too)"),
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
    Setting("SERVED_MODEL_NAME", None, help="model name clients use (vllm serve's name)"),
    # Chat options of `vllm serve`'s front end, applied by the engine (engine/chat.py).
    Setting("CHAT_TEMPLATE", None, help="Jinja chat template, or a file holding one (vllm serve's name)"),
    Setting("CHAT_TEMPLATE_CONTENT_FORMAT", None, help="auto (default), string or openai"),
    Setting("DEFAULT_CHAT_TEMPLATE_KWARGS", None, _json_object, help="JSON object passed to every chat template"),
    Setting("TRUST_REQUEST_CHAT_TEMPLATE", None, parse_bool),
    Setting("ENABLE_AUTO_TOOL_CHOICE", None, parse_bool, help="tool_choice auto, with TOOL_CALL_PARSER"),
    Setting("TOOL_CALL_PARSER", None, help="vLLM tool parser (hermes, llama3_json, mistral, pythonic, ...)"),
    Setting("TOOL_PARSER_PLUGIN", None, help="a Python file registering more tool parsers"),
    Setting("EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE", None, parse_bool),
    Setting("TOOL_STRICT_LEVEL", None, help="auto (default), function or parameter: how far tool calls under "
            "tool_choice auto are constrained (vllm serve's --tool-strict-level; forced calls always are)"),
    # Models beyond the base one.
    Setting("ENGINE_TASK", None, help="generate (default) or embed: with no MODEL_NAME, embed serves the "
            "packaged all-MiniLM-L6-v2"),
    Setting("LORA_MODULES", None, parse_lora_modules, help="LoRA adapters served from the start: name=path "
            "pairs, or JSON objects with name, path (and base_model_name)"),
    Setting("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None, parse_bool, help="adapters loaded and unloaded at run time "
            "(vLLM's switch; the engine enforces it, whoever asks)"),
    Setting("LORA_ROOT", None, help="run-time adapters only from inside this folder"),
    Setting("ENGINE_DRAIN_TIMEOUT_S", None, float, help="on SIGTERM, requests running may finish this long "
            "(the gateways route new ones elsewhere meanwhile; default 30; 0: stop at once)"),
    Setting("VLLM_CONFIG_FILE", None, help="a YAML file of vLLM engine arguments, as `vllm serve --config` "
            "reads; variables and flags win over it"),
    Setting("ENGINE_STALL_TIMEOUT_S", None, float, help="requests running and vLLM silent this long: the engine "
            "is stuck, fails them and exits to be replaced (default 180; 0: never)"),
)

# vLLM engine arguments not read from their upper-snake-case variable: named
# otherwise here (SETTINGS), or whose variable means something else to other
# programs (LOG_LEVEL is ours; MASTER_ADDR, NODE_RANK, ... are torch's).
NOT_FROM_ENV = {"help", "model", "tokenizer", "served_model_name", "log_level", "master_addr", "master_port",
                "nnodes", "node_rank"}


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """The `vllm serve` front-end options this engine applies to chat requests."""

    chat_template: str | None = None
    content_format: str = "auto"  # CHAT_TEMPLATE_CONTENT_FORMAT: auto, string or openai
    enable_auto_tools: bool = False  # ENABLE_AUTO_TOOL_CHOICE
    tool_parser: str | None = None  # TOOL_CALL_PARSER
    reasoning_parser: str | None = None  # REASONING_PARSER
    default_chat_template_kwargs: dict[str, Any] | None = None
    trust_request_chat_template: bool = False
    exclude_tools_when_tool_choice_none: bool = False
    tool_strict_level: str = "auto"  # TOOL_STRICT_LEVEL


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
        for var in (s.env, *s.also):
            if raw is None or raw == "":
                raw = env.get(var)
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


class _Refused(ValueError):
    pass


def vllm_args(env: Mapping[str, str], cli: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Engine arguments from their upper-snake-case variables, `VLLM_EXTRA_ARGS`
    and `cli` (in that order: later wins), parsed by `parser`, vLLM's own engine
    argument parser. Only what was given is returned. A value the parser refuses
    raises ValueError naming its variable (or the flag, when given as one)."""
    table = {s.env for s in SETTINGS}
    source: dict[str, str] = {}  # flag -> the variable it came from
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_FROM_ENV:
            continue
        var = action.dest.upper()
        raw = env.get(var)
        if var in table or raw is None or raw == "":
            continue
        flag = action.option_strings[0]
        source[flag] = var
        if action.nargs == 0:  # on/off flags: --x / --no-x (or --enable-x / --disable-x)
            try:
                on = parse_bool(raw)
            except ValueError as e:
                raise ValueError(f"{var}={raw!r}: {e}") from None
            if on:
                argv.append(flag)
            elif len(action.option_strings) > 1:
                argv.append(action.option_strings[1])
        elif action.nargs in ("+", "*"):
            argv += [flag, *shlex.split(raw)]
        else:
            argv.append(f"{flag}={raw}")
    extra = shlex.split(env.get("VLLM_EXTRA_ARGS", ""))
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # report only what was given

    def refuse(message: str) -> None:
        raise _Refused(message)

    parser.error = refuse  # type: ignore[method-assign]
    try:
        ns = parser.parse_args(argv + extra + list(cli))
    except _Refused as e:
        message = str(e)
        flag = re.search(r"argument (-[-\w]+)", message)
        var = source.get(flag.group(1).split("/")[0]) if flag else None
        if var is not None:
            raise ValueError(f"{var}={env.get(var)!r}: {message}") from None
        where = "VLLM_EXTRA_ARGS or the command line" if extra or cli else "engine arguments"
        raise ValueError(f"{where}: {message}") from None
    return vars(ns)


def config_file_args(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The engine arguments of a YAML file (VLLM_CONFIG_FILE), read by vLLM's own
    parser as `vllm serve --config` reads it."""
    try:
        return vllm_args({}, ["--config", path], parser)
    except (ValueError, OSError) as e:
        raise ValueError(f"VLLM_CONFIG_FILE={path!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - YAML's own errors
        raise ValueError(f"VLLM_CONFIG_FILE={path!r}: not readable as YAML: {e}") from None


def events_endpoint_for(endpoint: str, index: int) -> str:
    """KV_EVENTS_CONFIG's endpoint for engine `index` of a box. vLLM's publisher
    binds a wildcard or ipc endpoint and connects to any other: engines binding
    get one each (tcp port + index, ipc path + `-index`; engine 0 keeps it as
    given), engines connecting share the one subscriber they connect to."""
    if index == 0 or not endpoint:
        return endpoint
    if endpoint.startswith("ipc://"):
        return f"{endpoint}-{index}"
    m = re.fullmatch(r"(tcp://(?:\*|\[::\]|::)):(\d+)", endpoint)
    if m is not None and int(m.group(2)) != 0:
        return f"{m.group(1)}:{int(m.group(2)) + index}"
    return endpoint


def kv_events_for_engine(config: Any, index: int) -> Any:
    """vLLM's KV events config (as its parser made it) with this engine's endpoints."""
    if config is None or index == 0:
        return config
    fields = {"endpoint": events_endpoint_for(getattr(config, "endpoint", "") or "", index)}
    replay = getattr(config, "replay_endpoint", None)
    if replay:
        fields["replay_endpoint"] = events_endpoint_for(replay, index)
    return dataclasses.replace(config, **fields) if dataclasses.is_dataclass(config) else config


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
