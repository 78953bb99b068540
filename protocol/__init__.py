"""Every message that crosses a process boundary, and the one codec for them.

`messages` holds what the gateway and the engines say to each other over ZeroMQ;
`openai` holds the OpenAI HTTP request and response bodies. Nothing here imports
torch, vllm or transformers: both sides import this package.
"""
