"""The CPU gateway: OpenAI HTTP server, validation, formatting and routing to
engines over ZeroMQ. Never imports torch, vllm or transformers."""

import importlib.metadata

try:
    VERSION = importlib.metadata.version("vllm-gateway")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    VERSION = "0+unknown"
