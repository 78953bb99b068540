"""A tiny random-weight model for front-end benchmarks: SmolLM2's config and
tokenizer cut to 1 layer and hidden size 64, served with LOAD_FORMAT=dummy (vLLM
makes random weights). The engine core then costs next to nothing per token, so
what a benchmark measures is the serving front end in front of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


def build(dest: Path) -> Path:
    """The tiny model's folder (config and tokenizer, no weights), made once."""
    from vllm_gateway.engine import default_model

    source = default_model.ensure()
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    # Two heads of 32: vLLM's CPU attention takes head sizes from 32 up.
    config.update(num_hidden_layers=1, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, dest / name)
    return dest


if __name__ == "__main__":
    print(build(Path("benchmarks/results/tiny-smollm2")))
