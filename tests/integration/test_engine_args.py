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
