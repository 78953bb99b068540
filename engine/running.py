"""A generation running in vLLM, fed by vLLM's output handler directly.

`AsyncLLM.generate` wakes one asyncio task per request per engine step: vLLM's
output handler puts each request's output into its `RequestOutputCollector` and
sets an event, and the request's task wakes to take it. At 128 streams that is
128 task switches per step, the largest cost of this process after vLLM's own
detokenizer. Here the request's collector hands each output to `on_output`
instead, inside the output handler's own pass over the step: the step's deltas
are built and queued together, and go out as one `Outputs` message per gateway.

vLLM's output processor, detokenizer and stop-string handling are untouched;
only the hand-off from the collector changes. The collector (`AsyncLLM.add_request`
returns it) keeps its public `put`/`get_nowait` shape in both vLLM builds we run.
"""

from __future__ import annotations

from typing import Any, Protocol

from vllm_gateway.engine.outputs import OutputBuilder
from vllm_gateway.engine.stats import CoreTimes, RequestStats
from vllm_gateway.protocol.messages import Delta


class Server(Protocol):
    """What a running request needs of its engine server (engine/server.py)."""

    llm: Any  # vLLM's AsyncLLM
    running: dict[str, "Running"]
    progress: int  # outputs vLLM has handed over, ever

    def queue_deltas(self, ident: bytes, deltas: list[Delta]) -> None: ...

    def forget(self, rid: str) -> None: ...

    def fail(self, ident: bytes, rid: str, e: BaseException) -> None: ...

    def spawn(self, coro: Any) -> None: ...


class Running:
    __slots__ = ("server", "ident", "rid", "builder", "stats", "internal_id", "ended")

    def __init__(self, server: Server, ident: bytes, rid: str, builder: OutputBuilder,
                 stats: RequestStats) -> None:
        self.server = server
        self.ident = ident
        self.rid = rid
        self.builder = builder
        self.stats = stats
        self.internal_id: str | None = None  # vLLM's id of the request (ours plus a suffix)
        self.ended = False

    def attach(self, queue: Any) -> None:
        """Take over vLLM's collector of this request: what it holds already (an
        output that came while `add_request` was finishing), then every later
        output as it is put."""
        self.internal_id = queue.request_id
        self.server.running[self.rid] = self
        try:
            early = queue.get_nowait()
        except Exception as e:  # noqa: BLE001 - e.g. the engine died meanwhile
            early = e
        queue.put = self.on_output  # the instance attribute wins over the method
        if self.stats.clock is not None:  # vLLM's per-iteration stats are off: its core timestamps are read here
            core = getattr(queue, "core_times", None)
            if core is None:
                core = queue.core_times = CoreTimes()
            self.stats.core = core
        if early is not None:
            self.on_output(early)

    def on_output(self, out: Any) -> None:
        """One step's output of this request (or the exception that ends it).
        Runs inside vLLM's output handler: it must not raise."""
        if self.ended:
            return  # aborted by the gateway: vLLM's final "abort" output is not sent
        self.server.progress += 1  # vLLM is making progress (the stall watch reads it)
        try:
            if isinstance(out, BaseException):
                raise out
            builder = self.builder
            deltas = builder.deltas(out)
            new_tokens = 0
            for d in deltas:
                new_tokens += len(d.token_ids)
            self.stats.on_output(builder.num_prompt, new_tokens, out.num_cached_tokens)
            self.server.queue_deltas(self.ident, deltas)
            if out.finished:
                self.ended = True
                self.stats.on_finish(builder.reasons, out.metrics)
                self.server.forget(self.rid)
        except Exception as e:  # noqa: BLE001 - the failure goes to the gateway
            unfinished = not self.ended and not isinstance(out, BaseException)
            self.ended = True
            self.server.fail(self.ident, self.rid, e)
            if unfinished:
                self._abort_in_vllm()

    def abort(self) -> None:
        """The gateway gave up on the request."""
        if not self.ended:
            self.ended = True
            self.stats.on_abort()
            self.server.forget(self.rid)
            self._abort_in_vllm()

    def _abort_in_vllm(self) -> None:
        llm = self.server.llm
        if llm is not None and self.internal_id is not None and not llm.errored:
            self.server.spawn(llm.abort(self.internal_id, internal=True))
