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
    ns = build_parser().parse_args(argv)
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

    for choice in engine_args.apply_platform_defaults(
        settings, os.environ, on_gpu=torch.cuda.is_available(), cpu_has_bf16=_cpu_has_bf16()
    ):
        log.info("default for this machine: %s", choice)
    served = settings.get("OPENAI_SERVED_MODEL_NAME_OVERRIDE")
    if "MODEL_NAME" not in settings:
        settings["MODEL_NAME"] = str(default_model.ensure(settings.get("BASE_PATH")))
        served = served or default_model.SERVED_NAME
    served = served or settings["MODEL_NAME"]

    from vllm_gateway.engine import server

    kwargs = engine_args.engine_kwargs(settings, server.supported_engine_args())
    kwargs["served_model_name"] = served
    log.info("engine arguments: %s", engine_args.redacted(kwargs))
    config = server.EngineConfig(
        engine_args=kwargs,
        served_model_name=served,
        endpoint=endpoint,
        engine_id=ns.engine_id,
        chat_template=settings.get("CUSTOM_CHAT_TEMPLATE"),
        keys=keys,
    )
    return server.serve(config)


if __name__ == "__main__":
    sys.exit(main())
