"""The CPU gateway: OpenAI HTTP server, validation, formatting and routing to
engines over ZeroMQ. Never imports torch, vllm or transformers."""
