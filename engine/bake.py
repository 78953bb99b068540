"""`vllm-gateway bake`: put the model into the cache at image build time, so a
worker starts without downloading anything.

Reads the engine's own settings: MODEL_NAME, MODEL_REVISION, TOKENIZER_NAME,
TOKENIZER_REVISION, BASE_PATH, and HF_TOKEN (from the environment or, in a
Docker build, the secret file /run/secrets/HF_TOKEN; never logged). A Hugging
Face repo is downloaded to `$BASE_PATH/huggingface-cache/hub`, where the engine
looks (its download dir, and HF_HOME=$BASE_PATH/huggingface-cache for the
tokenizer); with no MODEL_NAME the embedded default model is converted into
`$BASE_PATH/models`; a local directory is used as it is.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from vllm_gateway.engine import default_model

log = logging.getLogger("engine.bake")

SECRET_FILE = "/run/secrets/HF_TOKEN"
# Weights in these formats are skipped when the repo also has safetensors.
LEGACY_WEIGHTS = ["*.bin", "*.pt", "*.pth"]
NEVER = ["original/*", "*.gguf", "consolidated*.safetensors"]


def hf_token(env: Mapping[str, str]) -> str | None:
    token = env.get("HF_TOKEN")
    if not token and os.path.isfile(SECRET_FILE):
        token = Path(SECRET_FILE).read_text().strip()
    return token or None


def hub_cache(base_path: str) -> Path:
    return Path(base_path) / "huggingface-cache" / "hub"


def _download(repo: str, revision: str | None, cache: Path, token: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi(token=token).list_repo_files(repo, revision=revision)
    ignore = list(NEVER)
    if any(f.endswith(".safetensors") for f in files):
        ignore += LEGACY_WEIGHTS
    log.info("downloading %s%s into %s", repo, f"@{revision}" if revision else "", cache)
    return Path(snapshot_download(repo, revision=revision, cache_dir=cache, token=token, ignore_patterns=ignore))


def bake(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Fetch or convert the model (and a separate tokenizer); returns their folders."""
    base_path = env.get("BASE_PATH") or "/models"
    model = env.get("MODEL_NAME")
    if not model:
        return [default_model.ensure(base_path)]
    token = hf_token(env)
    out = []
    for name, revision in ((model, env.get("MODEL_REVISION")), (env.get("TOKENIZER_NAME"), env.get("TOKENIZER_REVISION"))):
        if not name:
            continue
        if os.path.isdir(name):
            log.info("%s is a local folder; nothing to download", name)
            out.append(Path(name))
        else:
            out.append(_download(name, revision or None, hub_cache(base_path), token))
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    for path in bake():
        log.info("baked: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
