"""Background responses (`background: true`) this process runs: each a task that
streams its events into the store (so any gateway sharing the store can replay
them) and ends the response there, whatever way it ends.

One watch task renews the leases of the running ones and learns of cancels
asked on other gateways (and of deletes), every `LEASE_RENEW_S`: one store call
for all of them. A gateway that dies stops renewing; its responses' leases
lapse and the next reader ends them `failed` (`serving.settle_lapsed`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from vllm_gateway.gateway.core.admission import Admission
from vllm_gateway.gateway.core.calls import Call, CallRun
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.core.schema import json_encode
from vllm_gateway.gateway.engines.client import EngineClient
from vllm_gateway.gateway.responses.formatting import ResponsesFormatter
from vllm_gateway.gateway.responses.schemas import Failed, Response, ResponseError
from vllm_gateway.gateway.responses.store import LEASE_RENEW_S, ResponseStore

log = logging.getLogger("gateway.responses")

# A final state the store would not take (Redis away) is tried again for this long.
SETTLE_FOR_S = 30.0


class Runner:
    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self.tasks: dict[str, asyncio.Task] = {}
        self._why: dict[str, str] = {}  # why this gateway stopped one (it then ends failed, not cancelled)
        self._news: dict[str, asyncio.Event] = {}  # set on each stored batch: wakes replays here at once
        self._watch: asyncio.Task | None = None

    def start(self, client: EngineClient, call: Call, timeout_s: float, conversation: list[dict[str, Any]],
              owner: str | None, admission: Admission | None) -> None:
        """Run a response already stored as `queued`."""
        fmt = call.fmt
        assert isinstance(fmt, ResponsesFormatter)
        rid = fmt.book.id
        self._news[rid] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._run(rid, lambda: CallRun(client, call, timeout_s), fmt, conversation, owner, admission))
        self.tasks[rid] = task
        task.add_done_callback(lambda _: self._done(rid))
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    def _done(self, rid: str) -> None:
        self.tasks.pop(rid, None)
        self._why.pop(rid, None)
        news = self._news.pop(rid, None)
        if news is not None:
            news.set()

    async def wait_news(self, rid: str, timeout_s: float) -> None:
        """Until the next batch of `rid` is stored here, or `timeout_s` (a
        response run by another gateway is polled)."""
        news = self._news.get(rid)
        if news is None:
            await asyncio.sleep(timeout_s)
            return
        news.clear()
        try:
            await asyncio.wait_for(news.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def _run(self, rid: str, submit: Callable[[], CallRun], fmt: ResponsesFormatter,
                   conversation: list[dict[str, Any]], owner: str | None, admission: Admission | None) -> None:
        if admission is not None:
            admission.enter()  # accepted work: counted against the cap while it runs
        run: CallRun | None = None
        try:
            run = submit()
            await run.start()
            await self._settle(fmt.snapshot("in_progress"), conversation, owner, retry=False)
            while (objs := await run.next_batch()) is not None:
                if objs:
                    await self._append(rid, objs)
            assert fmt.final is not None
            await self._settle(fmt.final, conversation, owner)
        except asyncio.CancelledError:
            why = self._why.get(rid)
            if why is not None:  # not a client's cancel: this gateway is stopping
                await self._fail(fmt, conversation, owner, "server_error", why)
            else:
                await self._settle(fmt.snapshot("cancelled"), conversation, owner)
        except APIError as e:
            await self._fail(fmt, conversation, owner, str(e.code or e.type), e.message)
        except Exception as e:  # a fault of ours: the response says so, the log has the rest
            log.exception("background response %s failed", rid)
            await self._fail(fmt, conversation, owner, "server_error", f"internal gateway error: {type(e).__name__}")
        finally:
            if run is not None:
                run.close()
            if admission is not None:
                admission.leave()

    async def _append(self, rid: str, objs: list[Any]) -> None:
        try:
            await self.store.append(rid, [json_encode(o) for o in objs])
        except APIError:
            pass  # the store is away: the run goes on (its end is retried; a replay misses these events)
        news = self._news.get(rid)
        if news is not None:
            news.set()

    async def _fail(self, fmt: ResponsesFormatter, conversation: list[dict[str, Any]], owner: str | None,
                    code: str, message: str) -> None:
        log.warning("background response %s failed: %s (%s)", fmt.book.id, message, code)
        failed = fmt.snapshot("failed")
        failed.error = ResponseError(code, message)
        await self._append(failed.id, [Failed(response=failed, sequence_number=fmt.seq)])
        await self._settle(failed, conversation, owner)

    async def _settle(self, response: Response, conversation: list[dict[str, Any]], owner: str | None,
                      retry: bool = True) -> None:
        """Store the response's new state; a final one is tried again while the
        store is away, so accepted work does not end silently."""
        deadline = asyncio.get_running_loop().time() + (SETTLE_FOR_S if retry else 0)
        while True:
            try:
                await self.store.update(response, conversation, owner)
                return
            except APIError as e:
                if asyncio.get_running_loop().time() >= deadline:
                    if retry:
                        log.error("background response %s ended %s, but the store would not take it: %s",
                                  response.id, response.status, e.message)
                    return
            await asyncio.sleep(1.0)

    def cancel(self, rid: str, why: str | None = None) -> asyncio.Task | None:
        """Stop a response run here (`why`: this gateway stops it; it ends failed)."""
        task = self.tasks.get(rid)
        if task is None or task.done():
            return None
        if why is not None:
            self._why[rid] = why
        task.cancel()
        return task

    async def _watch_loop(self) -> None:
        while self.tasks:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                stop = await self.store.heartbeat(list(self.tasks))
            except APIError:
                continue  # the store is away: the leases run on; they are renewed when it is back
            for rid in stop:
                self.cancel(rid)

    async def fail_running(self, why: str) -> int:
        """This gateway stops: the responses it runs end `failed`, saying why,
        instead of vanishing with the process."""
        tasks = [t for rid in list(self.tasks) if (t := self.cancel(rid, why)) is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._watch is not None:
            self._watch.cancel()
        return len(tasks)
