"""The engine process: a thin adapter serving one vLLM AsyncLLM over ZeroMQ."""
