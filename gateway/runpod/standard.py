"""RunPod's standard mode: a job's `prompt` or `messages` with vLLM-named
`sampling_params` as one engine request, and its output in worker-vllm's shape
(`{"choices": [{"tokens": [...]}], "usage": {"input": N, "output": M}}`)."""

from __future__ import annotations

from vllm_gateway.gateway.core.answer import Answer, Book
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.generate import chat_messages, sampling_params, structured_outputs
from vllm_gateway.gateway.runpod.schemas import JobChoice, JobInput, JobOutput, JobSamplingParams, JobUsage
from vllm_gateway.protocol.messages import ChatPrompt, Delta, Generate, Prompt, TextPrompt


def job_generate(job: JobInput, request_id: str) -> Generate:
    """A RunPod standard-mode job: `messages` (chat template applied), or `prompt`
    (as it is, or as one user message with `apply_chat_template`). With no
    `max_tokens` the answer may use what the context has left, as chat does."""
    sp = job.sampling_params or JobSamplingParams()
    if job.messages is not None:
        prompt: Prompt = ChatPrompt(chat_messages(job.messages))
    elif job.prompt is not None:
        if job.prompt == "":
            raise APIError(400, "prompt must not be empty", param="prompt")
        if job.apply_chat_template:
            prompt = ChatPrompt([{"role": "user", "content": job.prompt}])
        else:
            prompt = TextPrompt(job.prompt)
    else:
        raise APIError(400, "the job input needs `prompt` or `messages` (or `openai_route`)", param="prompt")
    params = sampling_params(sp, sp.max_tokens, None, None)
    params.structured_outputs = structured_outputs(sp)  # `structured_outputs` or the `guided_*` names
    return Generate(request_id, prompt, params)


class JobFormatter:
    """RunPod standard-mode output: `{"choices": [{"tokens": [...]}, ...],
    "usage": {"input": N, "output": M}}`, one text piece per engine step and choice."""

    def __init__(self, request_id: str, n: int) -> None:
        self.book = Book([request_id], n, "", "job")
        self.answers = [Answer() for _ in range(n)]

    def chunks(self, deltas: list[Delta]) -> list[tuple[int, str, int]]:
        """(choice, text, token count) of each delta, in order; not merged, so
        that stream batches can be cut at exact token counts."""
        out = []
        for d in deltas:
            idx, _ = self.book.account(d)
            if d.text or d.token_ids:
                out.append((idx, d.text, len(d.token_ids)))
        return out

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            idx, _ = self.book.account(d)
            self.answers[idx].add(d)

    def empty(self) -> list[list[str]]:
        return [[] for _ in range(self.book.n)]

    def output(self, pieces: list[list[str]], output_tokens: int) -> JobOutput:
        """One stream batch; `output_tokens` counts every token sent so far."""
        return JobOutput([JobChoice(p) for p in pieces], JobUsage(self.book.usage().prompt, output_tokens))

    def response(self) -> JobOutput:
        usage = self.book.usage()
        return JobOutput([JobChoice([a.text]) for a in self.answers], JobUsage(usage.prompt, usage.completion))
