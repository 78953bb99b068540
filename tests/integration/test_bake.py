"""`vllm-gateway bake`: the model an image carries, converted or downloaded into
BASE_PATH before the image is shipped (processes, and the embedded model's
conversion: integration)."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT, child_env


def test_bake_local_folder_is_used_as_is(tmp_path):
    from vllm_gateway.engine.bake import bake

    assert bake({"MODEL_NAME": str(tmp_path), "BASE_PATH": str(tmp_path / "base")}) == [tmp_path]


def test_bake_embedded_model_into_base_path(tmp_path):
    """`vllm-gateway bake` with no MODEL_NAME converts the embedded model into
    BASE_PATH/models, where the engine looks for it."""
    env = child_env(BASE_PATH=str(tmp_path))
    env.pop("MODEL_NAME", None)
    r = subprocess.run([sys.executable, "-m", "vllm_gateway.gateway", "bake"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert (folder / "tokenizer_config.json").exists()
    assert "baked: " + str(folder) in r.stderr
