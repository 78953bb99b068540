"""Unit: engine settings from the environment of RunPod's worker-vllm, flags on top."""

import logging

import pytest

from vllm_gateway.engine.args import apply_platform_defaults, collect, engine_kwargs, redacted

SUPPORTED = {"model", "revision", "max_model_len", "dtype", "enforce_eager", "tensor_parallel_size",
             "max_num_seqs", "trust_remote_code", "hf_token", "download_dir", "enable_log_requests",
             "gpu_memory_utilization", "tokenizer", "seed"}


def test_env_then_cli_override():
    env = {"MODEL_NAME": "org/m", "MAX_MODEL_LEN": "4096", "TRUST_REMOTE_CODE": "1", "DTYPE": "half",
           "TENSOR_PARALLEL_SIZE": "2", "MAX_NUM_SEQS": "64", "SEED": "5", "TOKENIZER_NAME": "org/t"}
    s = collect(env, {"MAX_MODEL_LEN": "1024", "DTYPE": None})
    kw = engine_kwargs(s, SUPPORTED)
    assert kw["model"] == "org/m" and kw["max_model_len"] == 1024 and kw["dtype"] == "half"
    assert kw["trust_remote_code"] is True and kw["tensor_parallel_size"] == 2 and kw["max_num_seqs"] == 64
    assert kw["tokenizer"] == "org/t" and kw["seed"] == 5
    assert kw["disable_log_stats"] is True and kw["enable_log_requests"] is False


def test_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="MAX_MODEL_LEN"):
        collect({"MAX_MODEL_LEN": "lots"})
    with pytest.raises(ValueError, match="ENFORCE_EAGER"):
        collect({"ENFORCE_EAGER": "maybe"})


def test_setting_vllm_dropped_is_logged_not_fatal(caplog):
    s = collect({"SWAP_SPACE": "4", "MAX_CONTEXT_LEN_TO_CAPTURE": "8192", "MODEL_NAME": "m"})
    with caplog.at_level(logging.WARNING):
        kw = engine_kwargs(s, SUPPORTED)
    assert "swap_space" not in kw and kw["model"] == "m"
    assert "SWAP_SPACE" in caplog.text and "MAX_CONTEXT_LEN_TO_CAPTURE" in caplog.text


def test_base_path_and_token_never_logged():
    kw = engine_kwargs(collect({"BASE_PATH": "/vol", "HF_TOKEN": "hf_secret"}), SUPPORTED)
    assert kw["download_dir"] == "/vol/huggingface-cache/hub"
    assert "hf_secret" not in repr(redacted(kw))


def test_cpu_defaults():
    settings, env = {}, {}
    apply_platform_defaults(settings, env, on_gpu=False, cpu_has_bf16=False)
    assert settings == {"ENFORCE_EAGER": True, "DTYPE": "float32"} and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    settings, env = {"DTYPE": "bfloat16", "ENFORCE_EAGER": False}, {}
    apply_platform_defaults(settings, env, on_gpu=False, cpu_has_bf16=False)
    assert settings["DTYPE"] == "bfloat16" and settings["ENFORCE_EAGER"] is False
    settings, env = {}, {}
    apply_platform_defaults(settings, env, on_gpu=True, cpu_has_bf16=False)
    assert settings == {} and env == {}


# ----------------------------------------------------------------- engine groups

from vllm_gateway.gateway.supervisor.launcher import plan_engines  # noqa: E402


def test_one_engine_per_gpu_group():
    slots = plan_engines({"TENSOR_PARALLEL_SIZE": "2"}, [], "/run", gpus=[str(i) for i in range(8)])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3", "4,5", "6,7"]
    assert [s.endpoint for s in slots] == [f"ipc:///run/engine-{i}" for i in range(4)]
    # flags count like the environment; pipeline stages multiply the group
    slots = plan_engines({}, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], "/r", gpus=list("01234567"))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1,2,3", "4,5,6,7"]
    slots = plan_engines({"NUM_ENGINES": "1", "TENSOR_PARALLEL_SIZE": "2"}, [], "/r", gpus=["3", "5", "6", "7"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3,5"]
    with pytest.raises(ValueError, match="need 6 GPUs"):
        plan_engines({"NUM_ENGINES": "3", "TENSOR_PARALLEL_SIZE": "2"}, [], "/r", gpus=list("0123"))


def test_cpu_engines_get_their_own_cores():
    [one] = plan_engines({}, [], "/r", gpus=[], cpus=[0, 1, 2, 3])
    assert one.env == {} and one.cpus is None  # one engine: vLLM binds as it likes
    a, b = plan_engines({"NUM_ENGINES": "2"}, [], "/r", gpus=[], cpus=[0, 1, 2, 3, 4])
    assert (a.cpus, b.cpus) == ({0, 1, 2}, {3, 4})
    assert (a.env["VLLM_CPU_OMP_THREADS_BIND"], b.env["VLLM_CPU_OMP_THREADS_BIND"]) == ("0,1,2", "3,4")
    with pytest.raises(ValueError, match="at least 3 cores"):
        plan_engines({"NUM_ENGINES": "3"}, [], "/r", gpus=[], cpus=[0, 1])
    with pytest.raises(ValueError, match="NUM_ENGINES"):
        plan_engines({"NUM_ENGINES": "zero"}, [], "/r", gpus=[], cpus=[0])


def test_ray_engine_spans_nodes():
    [slot] = plan_engines({"DISTRIBUTED_EXECUTOR_BACKEND": "ray", "PIPELINE_PARALLEL_SIZE": "2"}, [], "/r", gpus=list("01"))
    assert slot.env == {}


# ------------------------------------------------ every vLLM engine argument by its variable


@pytest.fixture(scope="module")
def vllm_parser():
    pytest.importorskip("vllm")
    from vllm_gateway.engine.server import engine_arg_parser

    return engine_arg_parser


def test_any_engine_argument_from_its_variable(vllm_parser):
    from vllm_gateway.engine.args import vllm_args

    env = {
        "LONG_PREFILL_TOKEN_THRESHOLD": "4096",
        "SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}',
        "KV_TRANSFER_CONFIG": '{"kv_connector": "ExampleConnector", "kv_role": "kv_both"}',
        "ENABLE_EXPERT_PARALLEL": "1",
        "ENABLE_CHUNKED_PREFILL": "false",  # an on/off flag turned off
        "LIMIT_MM_PER_PROMPT": '{"image": 2}',
        "REASONING_PARSER": "qwen3",
        "MAX_MODEL_LEN": "999",  # a worker-vllm setting: read by `collect`, not here
        "LOG_LEVEL": "DEBUG", "MASTER_PORT": "29500",  # others' variables: never engine arguments
        "VLLM_EXTRA_ARGS": "--max-num-seqs 7 --block-size=32",
    }
    got = vllm_args(env, ["--max-logprobs", "5"], vllm_parser())
    assert got["long_prefill_token_threshold"] == 4096 and got["enable_expert_parallel"] is True
    assert got["enable_chunked_prefill"] is False
    assert got["speculative_config"]["num_speculative_tokens"] == 3
    assert got["kv_transfer_config"].kv_role == "kv_both" if hasattr(got["kv_transfer_config"], "kv_role") \
        else got["kv_transfer_config"]["kv_role"] == "kv_both"
    assert got["limit_mm_per_prompt"] == {"image": 2} and got["reasoning_parser"] == "qwen3"
    assert got["max_num_seqs"] == 7 and got["block_size"] == 32 and got["max_logprobs"] == 5
    assert "max_model_len" not in got and "log_level" not in got and "master_port" not in got


def test_a_value_vllm_refuses_names_its_variable(vllm_parser):
    from vllm_gateway.engine.args import vllm_args

    with pytest.raises(ValueError, match=r"^LONG_PREFILL_TOKEN_THRESHOLD='lots'"):
        vllm_args({"LONG_PREFILL_TOKEN_THRESHOLD": "lots"}, [], vllm_parser())
    with pytest.raises(ValueError, match=r"^SPECULATIVE_CONFIG="):
        vllm_args({"SPECULATIVE_CONFIG": "{not json"}, [], vllm_parser())
    with pytest.raises(ValueError, match=r"^ENABLE_EXPERT_PARALLEL="):
        vllm_args({"ENABLE_EXPERT_PARALLEL": "perhaps"}, [], vllm_parser())
    with pytest.raises(ValueError, match=r"^SCHEDULING_POLICY='random'.*invalid choice"):
        vllm_args({"SCHEDULING_POLICY": "random"}, [], vllm_parser())
    with pytest.raises(ValueError, match="VLLM_EXTRA_ARGS or the command line"):
        vllm_args({"VLLM_EXTRA_ARGS": "--no-such-flag"}, [], vllm_parser())


def test_lora_modules_in_both_forms():
    from vllm_gateway.engine.args import parse_lora_modules

    assert parse_lora_modules("a=/x/a b=/x/b,c=/x/c") == [
        {"name": "a", "path": "/x/a"}, {"name": "b", "path": "/x/b"}, {"name": "c", "path": "/x/c"}]
    one = '{"name": "a", "path": "/x/a", "base_model_name": "m"}'
    assert parse_lora_modules(one) == [{"name": "a", "path": "/x/a", "base_model_name": "m"}]
    assert parse_lora_modules(f"[{one}]") == parse_lora_modules(one + "\n" + one)[:1]
    for bad in ("a", "=/x", '{"name": "a"}'):
        with pytest.raises(ValueError):
            parse_lora_modules(bad)
    with pytest.raises(ValueError, match="LORA_MODULES"):
        collect({"LORA_MODULES": "nonsense"})


def test_worker_vllm_tokenizer_variable():
    """worker-vllm's TOKENIZER names the tokenizer as TOKENIZER_NAME does; TOKENIZER_NAME wins."""
    assert engine_kwargs(collect({"TOKENIZER": "org/t"}), SUPPORTED)["tokenizer"] == "org/t"
    assert engine_kwargs(collect({"TOKENIZER": "org/t", "TOKENIZER_NAME": "org/u"}), SUPPORTED)["tokenizer"] == "org/u"


def test_vllm_config_file_under_variables_and_flags(vllm_parser, tmp_path):
    """VLLM_CONFIG_FILE: vLLM's own YAML config (`vllm serve --config`), read by its
    parser; whatever a variable or flag sets wins over the file."""
    from vllm_gateway.engine.args import config_file_args, vllm_args

    path = tmp_path / "engine.yaml"
    path.write_text("max-num-seqs: 12\nblock-size: 32\nreasoning-parser: qwen3\nlong-prefill-token-threshold: 100\n"
                    "speculative-config:\n  method: ngram\n  num_speculative_tokens: 2\n  prompt_lookup_max: 3\n")
    from_file = config_file_args(str(path), vllm_parser())
    assert from_file["max_num_seqs"] == 12 and from_file["block_size"] == 32
    assert from_file["reasoning_parser"] == "qwen3" and from_file["speculative_config"]["num_speculative_tokens"] == 2
    given = vllm_args({"LONG_PREFILL_TOKEN_THRESHOLD": "200", "VLLM_EXTRA_ARGS": "--block-size 64"}, [], vllm_parser())
    settings = collect({"VLLM_CONFIG_FILE": str(path), "MAX_NUM_SEQS": "3"})
    merged = {**from_file, **engine_kwargs(settings, SUPPORTED), **given}  # as engine/main.py merges them
    assert merged["max_num_seqs"] == 3 and merged["block_size"] == 64 and merged["long_prefill_token_threshold"] == 200

    with pytest.raises(ValueError, match=r"^VLLM_CONFIG_FILE="):
        config_file_args(str(tmp_path / "missing.yaml"), vllm_parser())
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduling-policy: random\n")
    with pytest.raises(ValueError, match=r"^VLLM_CONFIG_FILE=.*invalid choice"):
        config_file_args(str(bad), vllm_parser())


def test_hub_json_in_the_hubs_conventions_and_read_by_the_code(vllm_parser):
    """.runpod/hub.json: MODEL_NAME required, of the Hugging Face type; every other
    field advanced; readable titles; enumerations as options, each one vLLM (or
    this gateway) accepts; and no field the code does not read."""
    import json
    import re
    import typing

    from support import ROOT
    from vllm_gateway.engine.args import NOT_FROM_ENV, SETTINGS

    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    config = hub["config"]
    assert hub["type"] == "serverless" and config["runsOn"] == "GPU"
    assert config["gpuIds"] and config["allowedCudaVersions"] and config["gpuCount"] >= 1
    env = config["env"]
    keys = [e["key"] for e in env]
    assert len(keys) == len(set(keys)), "a field offered twice"
    first = env[0]
    assert first["key"] == "MODEL_NAME" and first["input"]["type"] == "huggingface" and first["input"]["required"]
    for e in env[1:]:
        assert e["input"].get("advanced") is True, e["key"]
    for e in env:
        inp = e["input"]
        assert inp["type"] in ("huggingface", "string", "number", "boolean"), e
        assert inp["description"].strip() and inp["name"].strip(), e
        assert not re.search(r"\b(Hf|Gpu|Kv|Lora|Openai|Vllm|Len|Num|Seqs)\b", inp["name"]), inp["name"]
        if "options" in inp:
            assert inp.get("default") is None or inp["default"] in [o["value"] for o in inp["options"]], e

    # read by the code: a setting of ours, a variable the gateway reads, or a vLLM
    # engine argument (read from its upper-snake-case variable)
    ours = {s.env for s in SETTINGS} | {v for s in SETTINGS for v in s.also}
    source = "\n".join(p.read_text() for d in ("gateway", "engine") for p in (ROOT / d).rglob("*.py"))
    gateway_reads = set(re.findall(r'(?:_env\(env, |get\(|getenv\()"([A-Z][A-Z0-9_]+)"', source))
    engine_args = {a.dest.upper() for a in vllm_parser()._actions if a.option_strings and a.dest not in NOT_FROM_ENV}
    unread = [k for k in keys if k not in ours | gateway_reads | engine_args]
    assert not unread, f"hub.json offers settings nothing reads: {unread}"

    # enumerations: what vLLM accepts
    from vllm.config.cache import CacheDType
    from vllm.config.model import ModelDType
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.model_loader import LoadFormats
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    def registered(manager) -> set[str]:
        return set(manager.list_registered()) if hasattr(manager, "list_registered") else set(
            getattr(manager, "tool_parsers", None) or getattr(manager, "reasoning_parsers", {}))

    accepted = {
        "DTYPE": set(typing.get_args(ModelDType)), "KV_CACHE_DTYPE": set(typing.get_args(CacheDType)),
        "LOAD_FORMAT": set(typing.get_args(LoadFormats)), "QUANTIZATION": set(QUANTIZATION_METHODS),
        "TOOL_CALL_PARSER": registered(ToolParserManager), "REASONING_PARSER": registered(ReasoningParserManager),
        "DISTRIBUTED_EXECUTOR_BACKEND": {"mp", "ray", "uni", "external_launcher"},
        "CHAT_TEMPLATE_CONTENT_FORMAT": {"auto", "string", "openai"},
        "TOOL_STRICT_LEVEL": {"auto", "function", "parameter"},
        "ENGINE_TASK": {"generate", "embed"}, "ROUTING": {"prefix", "least_loaded"},
    }
    with_options = {e["key"]: [o["value"] for o in e["input"]["options"]] for e in env if "options" in e["input"]}
    assert set(accepted) == set(with_options), "an enumeration without options, or options without a check"
    for key, values in with_options.items():
        assert set(values) <= accepted[key], (key, set(values) - accepted[key])


def test_tool_strict_level_as_vllm_takes_it():
    from vllm_gateway.engine.main import chat_settings

    assert chat_settings(collect({}), None).tool_strict_level == "auto"
    assert chat_settings(collect({"TOOL_STRICT_LEVEL": "parameter"}), None).tool_strict_level == "parameter"
    with pytest.raises(ValueError, match="TOOL_STRICT_LEVEL='always'"):
        chat_settings(collect({"TOOL_STRICT_LEVEL": "always"}), None)
