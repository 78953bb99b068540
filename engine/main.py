"""`vllm-gateway engine`: start one engine process (settings from env and flags)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vllm_gateway.engine import args as engine_args
from vllm_gateway.engine import default_model, reaper
from vllm_gateway.protocol import transport
from vllm_gateway.protocol.endpoints import default_engine_endpoint

log = logging.getLogger("engine")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-gateway engine", description=__doc__)
    p.add_argument("--endpoint", default=os.environ.get("ENGINE_ENDPOINT"),
                   help="ZeroMQ endpoint to bind (default: an ipc:// socket under XDG_RUNTIME_DIR or /tmp)")
    p.add_argument("--engine-id", default=os.environ.get("ENGINE_ID", "0"))
    engine_args.add_cli_flags(p)
    return p


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns, vllm_argv = build_parser().parse_known_args(argv)
    try:
        settings = engine_args.collect(os.environ, vars(ns))
    except ValueError as e:
        log.error("bad setting: %s", e)
        return 2
    endpoint = ns.endpoint or default_engine_endpoint(ns.engine_id)
    try:
        keys = transport.server_keys(endpoint)
    except (transport.InsecureEndpoint, OSError) as e:
        log.error("%s", e)
        return 2

    reaper.start()  # before anything is loaded: a small fork
    import torch  # only now: argument errors above should not wait for torch

    from vllm_gateway.engine import server

    try:
        given = engine_args.vllm_args(os.environ, vllm_argv, server.engine_arg_parser())
        from_file = {}
        if settings.get("VLLM_CONFIG_FILE"):
            from_file = engine_args.config_file_args(settings["VLLM_CONFIG_FILE"], server.engine_arg_parser())
            if "MODEL_NAME" not in settings and from_file.get("model"):
                settings["MODEL_NAME"] = from_file["model"]
        chosen = {**from_file, **given}
        chat = chat_settings(settings, chosen.get("reasoning_parser"))
    except (ValueError, OSError) as e:
        log.error("bad setting: %s", e)
        return 2
    for choice in engine_args.apply_platform_defaults(
        settings, os.environ, on_gpu=torch.cuda.is_available(), cpu_has_bf16=_cpu_has_bf16()
    ):
        log.info("default for this machine: %s", choice)
    served = (settings.get("OPENAI_SERVED_MODEL_NAME_OVERRIDE") or settings.get("SERVED_MODEL_NAME")
              or (chosen.get("served_model_name") or [None])[0])
    embedding = settings.get("ENGINE_TASK", "generate") == "embed"
    if settings.get("ENGINE_TASK", "generate") not in ("generate", "embed"):
        log.error("bad setting: ENGINE_TASK=%r: use generate or embed", settings["ENGINE_TASK"])
        return 2
    if "MODEL_NAME" not in settings:
        if embedding:
            settings["MODEL_NAME"] = str(default_model.ensure_embedding(settings.get("BASE_PATH")))
            served = served or default_model.EMBEDDING_SERVED_NAME
        else:
            settings["MODEL_NAME"] = str(default_model.ensure(settings.get("BASE_PATH")))
            served = served or default_model.SERVED_NAME
    served = served or settings["MODEL_NAME"]
    if embedding:
        given.setdefault("runner", "pooling")

    # The file first: every variable and flag wins over it.
    kwargs = {**from_file, **engine_args.engine_kwargs(settings, server.supported_engine_args()), **given}
    kwargs["served_model_name"] = served
    if kwargs.get("kv_events_config") is not None:  # KV_EVENTS_CONFIG: one publisher endpoint per engine of a box
        index = int(ns.engine_id) if str(ns.engine_id).isdigit() else 0
        kwargs["kv_events_config"] = engine_args.kv_events_for_engine(kwargs["kv_events_config"], index)
    log.info("engine arguments: %s", engine_args.redacted(kwargs))
    config = server.EngineConfig(
        engine_args=kwargs,
        served_model_name=served,
        endpoint=endpoint,
        engine_id=ns.engine_id,
        chat=chat,
        lora_modules=settings.get("LORA_MODULES", []),
        runtime_lora=bool(settings.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", False)),
        lora_root=settings.get("LORA_ROOT") or None,
        stall_timeout_s=settings.get("ENGINE_STALL_TIMEOUT_S", server.EngineConfig.stall_timeout_s),
        drain_timeout_s=settings.get("ENGINE_DRAIN_TIMEOUT_S", server.EngineConfig.drain_timeout_s),
        keys=keys,
    )
    return server.serve(config)


def chat_settings(settings: dict, reasoning_parser: str | None) -> engine_args.ChatSettings:
    """The chat options of `vllm serve`'s front end, from their variables."""
    template = settings.get("CHAT_TEMPLATE") or settings.get("CUSTOM_CHAT_TEMPLATE")
    if template is not None:
        from vllm.renderers.chat_utils import load_chat_template  # a file's path, or the template itself

        template = load_chat_template(template)
    plugin = settings.get("TOOL_PARSER_PLUGIN")
    if plugin:
        from vllm.tool_parsers import ToolParserManager

        ToolParserManager.import_tool_parser(plugin)
    parser = settings.get("TOOL_CALL_PARSER")
    auto = bool(settings.get("ENABLE_AUTO_TOOL_CHOICE", False))
    if auto and not parser:
        raise ValueError("ENABLE_AUTO_TOOL_CHOICE=1 needs TOOL_CALL_PARSER (as vllm serve's "
                         "--enable-auto-tool-choice needs --tool-call-parser)")
    if parser:
        from vllm.tool_parsers import ToolParserManager

        try:
            ToolParserManager.get_tool_parser(parser)
        except KeyError:
            raise ValueError(f"TOOL_CALL_PARSER={parser!r}: no such tool parser; vLLM has "
                             + ", ".join(sorted(ToolParserManager.list_registered()))) from None
    fmt = settings.get("CHAT_TEMPLATE_CONTENT_FORMAT", "auto")
    if fmt not in ("auto", "string", "openai"):
        raise ValueError(f"CHAT_TEMPLATE_CONTENT_FORMAT={fmt!r}: use auto, string or openai")
    strict = settings.get("TOOL_STRICT_LEVEL", "auto")
    if strict not in ("auto", "function", "parameter"):
        raise ValueError(f"TOOL_STRICT_LEVEL={strict!r}: use auto, function or parameter")
    return engine_args.ChatSettings(
        chat_template=template,
        content_format=fmt,
        enable_auto_tools=auto,
        tool_parser=parser,
        reasoning_parser=reasoning_parser,
        default_chat_template_kwargs=settings.get("DEFAULT_CHAT_TEMPLATE_KWARGS"),
        trust_request_chat_template=bool(settings.get("TRUST_REQUEST_CHAT_TEMPLATE", False)),
        exclude_tools_when_tool_choice_none=bool(settings.get("EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE", False)),
        tool_strict_level=strict,
    )


if __name__ == "__main__":
    sys.exit(main())
