"""Chat requests the way `vllm serve` handles them, with vLLM's own parts: its
`ChatCompletionRequest` checks the request (tools, tool_choice, structured
outputs), its `OnlineRenderer` renders it (chat template, content formats,
multimodal parts, tools in the template) and adjusts it (a `required` or named
tool choice becomes a constraint on the output), and its `Parser` (tool parser and
reasoning parser, by the names `vllm serve` takes) splits the output into
content, reasoning and tool calls, piece by piece or, for a client that reads
the whole answer, at the end.

A forced call (`required`, or a named function) gets arguments valid under the
tool's parameters whatever the parser: it renders through vLLM's JSON path (the
output constrained by a JSON schema of the tools' parameters and read back as
JSON, as `vllm serve` did before parsers had structural tags). A parser's
structural tag pins only a forced call's envelope unless the tool says
`strict: true` (SmolLM2 under hermes answered `"Paris"` for `{"city": ...}`);
even pinned, an XML format's grammar lets whitespace into values that its parser
keeps (qwen3_xml gave `celsius` with a newline each side for an enum of
`celsius`); and parsers with neither constrain nothing. The prompt is the same:
the template still shows the model its tools.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pydantic
from vllm.entrypoints.generate.base.protocol import DeltaMessage, ExtractedToolCallInformation
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.media.connector import MediaConnector
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.renderers.inputs.preprocess import extract_prompt_components
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager

from vllm_gateway.engine.args import ChatSettings
from vllm_gateway.engine.failures import BadRequest, from_vllm_error
from vllm_gateway.protocol.messages import ChatPrompt, ToolCallDelta

# The tool parser used when none is configured: `required` and named tool choices
# need none of a model's own (vLLM constrains the output to its JSON tool-call
# format and reads that back), so they work on any model, as in `vllm serve`
# versions before tool parsers became mandatory for them.
FORCED_ONLY = "vllm_gateway_forced_only"


class ForcedOnlyToolParser(ToolParser):
    """Finds no tool calls in free text: only forced (required / named) calls,
    which vLLM's standard JSON parsing reads, become tool calls."""

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)

    def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, *args, **kwargs):
        return DeltaMessage(content=delta_text) if delta_text else None


ToolParserManager.register_module(FORCED_ONLY, force=True, module=ForcedOnlyToolParser)


@dataclasses.dataclass
class RenderedChat:
    request: ChatCompletionRequest  # vLLM's, adjusted for tool calling
    engine_input: Any  # what AsyncLLM.generate takes
    prompt_ids: list[int]
    chat_template_kwargs: dict[str, Any]
    parser_cls: Any  # vLLM's Parser class that reads its output (None: no parsers)


# Content parts that carry media, and the key of their URL: what `media_parts` finds.
_MEDIA = {"image_url": "image", "audio_url": "audio", "video_url": "video", "input_audio": "audio"}


def media_parts(messages: list[dict]) -> list[tuple[str, str, str]]:
    """Each media part of a conversation: its field (`messages[0].content[1]`), its
    modality and its URL (a data URL for `input_audio`)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _MEDIA:
                continue
            body = part.get(kind)
            if kind == "input_audio":
                url = f"data:audio/{body.get('format', 'wav')};base64,{body.get('data', '')}" if isinstance(body, dict) else ""
            else:
                url = body.get("url", "") if isinstance(body, dict) else body if isinstance(body, str) else ""
            out.append((f"messages[{i}].content[{j}]", _MEDIA[kind], url))
    return out


def forced(req: ChatCompletionRequest) -> bool:
    """The request must call a tool: `required`, or a named function."""
    return bool(req.tools) and (req.tool_choice == "required" or isinstance(req.tool_choice, pydantic.BaseModel))


def _pydantic_error(e: pydantic.ValidationError) -> BadRequest:
    """vLLM's request model refused the request: its first complaint, with the
    field as `messages[0].content` rather than pydantic's tuple."""
    err = e.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, VLLMValidationError):
        return BadRequest(cause.args[0], cause.parameter)
    loc = ""
    for part in err.get("loc", ()):
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = str(cause) if cause is not None else err.get("msg", "invalid")
    return BadRequest(f"{loc}: {msg}" if loc else msg, loc or None)


class ChatRenderer:
    """Renders chat requests for one model and makes their output parsers."""

    def __init__(self, llm: Any, settings: ChatSettings) -> None:
        self.settings = settings
        self.model_config = llm.model_config
        self.tokenizer = llm.renderer.tokenizer
        auto = settings.enable_auto_tools and settings.tool_parser

        def renderer(tool_parser: str, strict_level: str) -> OnlineRenderer:
            return OnlineRenderer(
                model_config=llm.model_config,
                renderer=llm.renderer,
                request_logger=None,
                chat_template=settings.chat_template,
                chat_template_content_format=settings.content_format,  # type: ignore[arg-type]
                trust_request_chat_template=settings.trust_request_chat_template,
                # Always on for vLLM, so that it keeps a tool parser: ours when no
                # auto parser is configured; "auto" itself is refused in `render`.
                enable_auto_tools=True,
                exclude_tools_when_tool_choice_none=settings.exclude_tools_when_tool_choice_none,
                tool_parser=tool_parser,
                reasoning_parser=settings.reasoning_parser or "",
                default_chat_template_kwargs=settings.default_chat_template_kwargs,
                tool_strict_level=strict_level,
            )

        self.online = renderer(settings.tool_parser if auto else FORCED_ONLY, settings.tool_strict_level)
        # gpt-oss (Harmony) keeps vLLM's own handling: its calls are channels of its
        # format, and vLLM composes its parser by setting class attributes, which a
        # second renderer would overwrite for the first.
        harmony = llm.model_config.hf_config.model_type == "gpt_oss"
        self.forced = renderer(FORCED_ONLY, settings.tool_strict_level) if auto and not harmony else self.online
        # Loads media the way vLLM's renderer does, to find the part a render failed on.
        self.media = MediaConnector(allowed_local_media_path=llm.model_config.allowed_local_media_path,
                                    allowed_media_domains=llm.model_config.allowed_media_domains)

    def warmup(self) -> None:
        self.online.warmup()  # the forced renderer shares its template and tokenizer

    async def render(self, p: ChatPrompt, structured_outputs: dict | None, n: int) -> RenderedChat:
        """vLLM's request, checked and rendered. `max_tokens` is left out: the
        caller checks prompt and answer against the context (`inputs.py`)."""
        body: dict[str, Any] = {
            "messages": p.messages,
            "add_generation_prompt": p.add_generation_prompt,
            "continue_final_message": p.continue_final_message,
            "include_reasoning": p.include_reasoning,
            "stream": p.stream,
            "n": n,
        }
        for name in ("chat_template_kwargs", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort"):
            value = getattr(p, name)
            if value is not None:
                body[name] = value
        if structured_outputs is not None:
            body["structured_outputs"] = structured_outputs
        try:
            req = ChatCompletionRequest.model_validate(body)
        except pydantic.ValidationError as e:
            raise _pydantic_error(e) from None
        except VLLMValidationError as e:
            raise BadRequest(e.args[0], e.parameter) from None
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        if req.tools and req.tool_choice == "auto" and not (self.settings.enable_auto_tools and self.settings.tool_parser):
            raise BadRequest('"auto" tool choice requires ENABLE_AUTO_TOOL_CHOICE=1 and TOOL_CALL_PARSER to be set '
                             '(`vllm serve --enable-auto-tool-choice --tool-call-parser`); "required" or a named '
                             "function work without them", "tool_choice")
        online = self.forced if forced(req) else self.online
        try:
            result = await online.render_chat(req)
        except Exception as e:  # the template, the content format, media: the request's fault
            raise from_vllm_error(e, await self.part_at_fault(p.messages) or "messages") from None
        if not isinstance(result, tuple):  # vLLM's ErrorResponse
            raise BadRequest(result.error.message, result.error.param or "messages")
        _, (engine_input,) = result
        ids = extract_prompt_components(self.model_config, engine_input).token_ids
        return RenderedChat(req, engine_input, list(ids or []), online.effective_chat_template_kwargs(req),
                            online.parser)

    async def part_at_fault(self, messages: list[dict]) -> str | None:
        """The first media part that does not load, when rendering failed: vLLM's
        error does not say which (a broken image, an unreachable URL, a file too
        large). Only a failed request pays for the second look."""
        parts = media_parts(messages)
        if parts and not self.model_config.is_multimodal_model:
            return parts[0][0]  # a text-only model takes no media part at all
        fetch = {"image": self.media.fetch_image_async, "audio": self.media.fetch_audio_async,
                 "video": self.media.fetch_video_async}
        for field, modality, url in parts:
            try:
                await fetch[modality](url)
            except Exception:
                return field
        return None

    def wants_parser(self, chat: RenderedChat) -> bool:
        """vLLM's parsers read the output when it can hold reasoning or tool calls;
        a plain chat streams its text as it comes (as `vllm serve` without parsers)."""
        if chat.parser_cls is None:
            return False
        if self.settings.reasoning_parser:
            return True
        return bool(chat.request.tools) and chat.request.tool_choice != "none"

    def output_parser(self, chat: RenderedChat, stream: bool) -> "ChoiceParser":
        parser = chat.parser_cls(self.tokenizer, chat.request.tools, chat_template_kwargs=chat.chat_template_kwargs,
                                 model_config=self.model_config)
        parser.set_prompt_token_ids(chat.prompt_ids)
        return ChoiceParser(parser, chat, stream, auto_tools=bool(self.settings.enable_auto_tools
                                                                   and self.settings.tool_parser),
                            count_reasoning=bool(self.settings.reasoning_parser))

    def reasoning_kwargs(self, chat: RenderedChat) -> dict[str, Any]:
        """`reasoning_ended` and `reasoning_parser_kwargs` for `AsyncLLM.generate`:
        a structured output applies from the end of the reasoning on."""
        req = chat.request
        if chat.parser_cls is None or not self.settings.reasoning_parser:
            return {"reasoning_ended": req.resolve_reasoning_ended(None, chat.prompt_ids)}
        parser = chat.parser_cls(self.tokenizer, req.tools, chat_template_kwargs=chat.chat_template_kwargs,
                                 model_config=self.model_config)
        return {
            "reasoning_ended": req.resolve_reasoning_ended(parser, chat.prompt_ids),
            "reasoning_parser_kwargs": {"chat_template_kwargs": chat.chat_template_kwargs},
        }


@dataclasses.dataclass
class Parsed:
    content: str
    reasoning: str | None
    tool_calls: list[ToolCallDelta] | None


class ChoiceParser:
    """One choice's output through vLLM's parser: `parse_delta` per step for a
    streaming client, `parse` of the whole output at the end otherwise (as
    `vllm serve` does)."""

    def __init__(self, parser: Any, chat: RenderedChat, stream: bool, *, auto_tools: bool,
                 count_reasoning: bool) -> None:
        self.parser = parser
        self.request = chat.request
        self.prompt_ids = chat.prompt_ids
        self.stream = stream
        self.auto_tools = auto_tools
        self.count_reasoning = count_reasoning
        self.named = isinstance(chat.request.tool_choice, pydantic.BaseModel)
        self.tools_called = False
        self._texts: list[str] = []
        self._ids: list[int] = []

    def step(self, text: str, token_ids: Sequence[int], finished: bool) -> Parsed:
        if self.count_reasoning or not self.stream:
            self._ids.extend(token_ids)
        if self.stream:
            msg = self.parser.parse_delta(text, list(token_ids), self.request, self.prompt_ids, finished=finished)
            return self._from_delta(msg)
        self._texts.append(text)
        if not finished:
            return Parsed("", None, None)
        reasoning, content, calls = self.parser.parse(
            "".join(self._texts), self.request, enable_auto_tools=self.auto_tools, model_output_token_ids=self._ids)
        tool_calls = None
        if calls:
            self.tools_called = True
            tool_calls = [ToolCallDelta(i, c.id or make_tool_call_id(), c.name, c.arguments or "")
                          for i, c in enumerate(calls)]
        return Parsed(content or "", reasoning if self.request.include_reasoning else None, tool_calls)

    def _from_delta(self, msg: DeltaMessage | None) -> Parsed:
        if msg is None:
            return Parsed("", None, None)
        tool_calls = None
        if msg.tool_calls:
            self.tools_called = True
            tool_calls = [
                ToolCallDelta(tc.index, tc.id, tc.function.name if tc.function else None,
                              (tc.function.arguments or "") if tc.function else "")
                for tc in msg.tool_calls
            ]
        reasoning = msg.reasoning if self.request.include_reasoning else None
        return Parsed(msg.content or "", reasoning, tool_calls)

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's: `tool_calls` when the model called tools of its own accord or
        because `required` asked; `stop` for a named function, as in vLLM."""
        if reason == "stop" and self.tools_called and not self.named:
            return "tool_calls"
        return reason

    def reasoning_tokens(self) -> int | None:
        if not self.count_reasoning:
            return None
        return self.parser.count_reasoning_tokens(tuple(self._ids))
