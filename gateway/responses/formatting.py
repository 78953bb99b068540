"""Engine deltas -> a Responses API answer: the response object with its output
items (reasoning, message, function calls), or its stream of typed events in
OpenAI's order, numbered by `sequence_number`.

The engine has already split the output (vLLM's parsers): reasoning, content
and tool-call pieces arrive separately, so each becomes its own output item, in
the order the model wrote them."""

from __future__ import annotations

import time
import uuid
from typing import Any

from vllm_gateway.gateway.core.answer import OneChoiceAnswer, OutputLogprob, output_logprobs
from vllm_gateway.gateway.responses.schemas import (
    ArgumentsDelta,
    ArgumentsDone,
    Completed,
    Created,
    FunctionCallItem,
    Incomplete,
    IncompleteDetails,
    InProgress,
    ItemAdded,
    ItemDone,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    PartAdded,
    PartDone,
    ReasoningDelta,
    ReasoningDone,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseEvent,
    ResponseUsage,
    TextDelta,
    TextDone,
)
from vllm_gateway.protocol.messages import Delta, ToolCallDelta


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Open:
    """The output item being written now."""

    def __init__(self, kind: str, index: int, item_id: str, tool_index: int = -1) -> None:
        self.kind = kind  # reasoning, message or function_call
        self.index = index  # its output_index
        self.id = item_id
        self.tool_index = tool_index
        self.text = ""
        self.logprobs: list[OutputLogprob] = []
        self.call_id = ""
        self.name = ""


class ResponsesFormatter(OneChoiceAnswer):
    """One Responses API answer. `template` is the response object as created
    (request fields echoed); the formatter fills in output, status and usage."""

    def __init__(self, request_id: str, template: Response) -> None:
        super().__init__(request_id, template.model, "resp")
        self.book.id = template.id
        self.template = template
        self.items: list[OutputItem] = []
        self.seq = 0
        self.finish: str | None = None
        self._open: _Open | None = None
        self.final: Response | None = None  # the finished response, once made (what is stored)

    # ------------------------------------------------------------------ stream

    def _event(self, event: ResponseEvent) -> ResponseEvent:
        event.sequence_number = self.seq
        self.seq += 1
        return event

    def opening(self, first: list[Delta]) -> list[ResponseEvent]:
        snapshot = self.snapshot("in_progress")
        return [self._event(Created(response=snapshot)), self._event(InProgress(response=snapshot))]

    def chunks(self, deltas: list[Delta]) -> list[ResponseEvent]:
        out: list[ResponseEvent] = []
        for d in deltas:
            self.book.account(d)
            if d.reasoning:
                self._switch(out, "reasoning")
                self._append(out, d.reasoning)
            if d.text:
                self._switch(out, "message")
                self._append(out, d.text, output_logprobs(d.logprobs) if d.logprobs else None)
            elif d.logprobs and self._open is not None and self._open.kind == "message":
                # a token with no text of its own (the end of turn): its logprob, as the whole answer has it
                self._append(out, "", output_logprobs(d.logprobs))
            for call in d.tool_calls or []:
                self._switch(out, "function_call", call)
                if call.arguments:
                    self._append(out, call.arguments)
            if d.finish_reason is not None:
                self.finish = d.finish_reason
        return out

    def closing(self) -> list[ResponseEvent]:
        out: list[ResponseEvent] = []
        self._close(out)
        final = self._final()
        out.append(self._event(Completed(response=final) if final.status == "completed" else Incomplete(response=final)))
        return out

    def _switch(self, out: list[ResponseEvent], kind: str, call: ToolCallDelta | None = None) -> None:
        """Make the open item one of `kind` (a new tool call starts a new item)."""
        o = self._open
        if o is not None and o.kind == kind and (call is None or call.index == o.tool_index):
            return
        self._close(out)
        index = len(self.items)
        if kind == "reasoning":
            o = _Open(kind, index, _id("rs"))
            item: OutputItem = ReasoningItem(o.id, [], [], status="in_progress")
        elif kind == "message":
            o = _Open(kind, index, _id("msg"))
            item = OutputMessage(o.id, [], status="in_progress")
        else:
            assert call is not None
            o = _Open(kind, index, _id("fc"), call.index)
            o.call_id = call.id or _id("call")
            o.name = call.name or ""
            item = FunctionCallItem(o.id, o.call_id, o.name, "", status="in_progress")
        self._open = o
        self.items.append(item)  # replaced by the finished item when closed
        out.append(self._event(ItemAdded(output_index=index, item=item)))
        if kind == "message":
            out.append(self._event(PartAdded(item_id=o.id, output_index=index, content_index=0, part=OutputText(""))))
        elif kind == "reasoning":
            out.append(self._event(PartAdded(item_id=o.id, output_index=index, content_index=0, part=ReasoningText(""))))

    def _append(self, out: list[ResponseEvent], piece: str, logprobs: list[OutputLogprob] | None = None) -> None:
        o = self._open
        assert o is not None
        o.text += piece
        if o.kind == "message":
            if logprobs:
                o.logprobs += logprobs
            out.append(self._event(TextDelta(item_id=o.id, output_index=o.index, content_index=0, delta=piece,
                                             logprobs=logprobs or [])))
        elif o.kind == "reasoning":
            out.append(self._event(ReasoningDelta(item_id=o.id, output_index=o.index, content_index=0, delta=piece)))
        else:
            out.append(self._event(ArgumentsDelta(item_id=o.id, output_index=o.index, delta=piece)))

    def _close(self, out: list[ResponseEvent]) -> None:
        o, self._open = self._open, None
        if o is None:
            return
        item: OutputItem
        if o.kind == "message":
            part = OutputText(o.text, logprobs=o.logprobs)
            out.append(self._event(TextDone(item_id=o.id, output_index=o.index, content_index=0, text=o.text,
                                            logprobs=o.logprobs)))
            out.append(self._event(PartDone(item_id=o.id, output_index=o.index, content_index=0, part=part)))
            item = OutputMessage(o.id, [part])
        elif o.kind == "reasoning":
            part_r = ReasoningText(o.text)
            out.append(self._event(ReasoningDone(item_id=o.id, output_index=o.index, content_index=0, text=o.text)))
            out.append(self._event(PartDone(item_id=o.id, output_index=o.index, content_index=0, part=part_r)))
            item = ReasoningItem(o.id, [], [part_r])
        else:
            out.append(self._event(ArgumentsDone(item_id=o.id, output_index=o.index, arguments=o.text, name=o.name)))
            item = FunctionCallItem(o.id, o.call_id, o.name, o.text)
        self.items[o.index] = item
        out.append(self._event(ItemDone(output_index=o.index, item=item)))

    # ------------------------------------------------------------------- whole

    def response(self) -> Response:
        a = self.answer
        self.finish = a.finish_reason
        text = a.text
        if a.reasoning is not None:
            self.items.append(ReasoningItem(_id("rs"), [], [ReasoningText(a.reasoning)]))
        if text or not a.tool_calls:
            self.items.append(OutputMessage(_id("msg"), [OutputText(text, logprobs=output_logprobs(a.logprobs))]))
        for c in a.tool_calls:
            self.items.append(FunctionCallItem(_id("fc"), c.id or _id("call"), c.name or "", c.arguments))
        return self._final()

    # ----------------------------------------------------------------- objects

    def snapshot(self, status: str) -> Response:
        """The response as created, with `status` and no output yet."""
        t = self.template
        return Response(**{**_fields(t), "status": status, "output": [], "usage": None})

    def _final(self) -> Response:
        usage = self.book.usage()
        reasoning = usage.reasoning or 0
        incomplete = self.finish == "length"
        texts = [p.text for item in self.items if isinstance(item, OutputMessage) for p in item.content]
        final = Response(**{
            **_fields(self.template),
            "status": "incomplete" if incomplete else "completed",
            "output": list(self.items),
            "output_text": "".join(texts),
            "usage": ResponseUsage(usage.prompt, usage.completion, usage.total,
                                   output_tokens_details=OutputTokensDetails(reasoning)),
            "incomplete_details": IncompleteDetails("max_output_tokens") if incomplete else None,
        })
        self.final = final
        return final


def _fields(r: Response) -> dict[str, Any]:
    return {f: getattr(r, f) for f in r.__struct_fields__}


def now() -> int:
    return int(time.time())
