"""`vllm-gateway`: serve | engine | http.

- `serve`: engine(s) and the HTTP gateway as separate processes, in one command.
- `engine`: one engine process alone (for supervisord/systemd).
- `http`: the HTTP gateway alone, in front of engines started elsewhere.
- `runpod`: a RunPod serverless worker: engine(s) plus the RunPod job handler.
- `bake`: download (or convert) the configured model into BASE_PATH, for images.
- `keys`: make CURVE key pairs for engines reached over tcp:// from other hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from vllm_gateway.protocol.endpoints import parse_endpoints


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _http_parser(prog: str) -> argparse.ArgumentParser:
    """Flags over the settings' environment variables (gateway/config.py reads those)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--host", default=None, help="address to listen on (HOST; default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=None, help="PORT; default 8000")
    return p


def http_main(argv: list[str]) -> int:
    from vllm_gateway.gateway.config import GatewaySettings
    from vllm_gateway.gateway.openai.app import serve

    p = _http_parser("vllm-gateway http")
    p.add_argument("--engine-endpoints", default=None,
                   help="comma-separated ZeroMQ endpoints of the engines (ENGINE_ENDPOINTS)")
    ns = p.parse_args(argv)
    try:
        settings = GatewaySettings.from_env()
    except ValueError as e:
        logging.getLogger("gateway").error("bad setting: %s", e)
        return 2
    settings = dataclasses.replace(
        settings, host=ns.host or settings.host, port=ns.port or settings.port,
        engine_endpoints=parse_endpoints(ns.engine_endpoints) if ns.engine_endpoints else settings.engine_endpoints,
    )
    serve(settings)
    return 0


def serve_main(argv: list[str]) -> int:
    from vllm_gateway.gateway.supervisor.launcher import launch

    p = _http_parser("vllm-gateway serve")
    p.add_argument("--num-engines", default=None,
                   help="engines to start (NUM_ENGINES; default one per GPU group, 1 on CPU)")
    ns, engine_argv = p.parse_known_args(argv)
    return launch(ns.host, ns.port, engine_argv, ns.num_engines)


def engine_main(argv: list[str]) -> int:
    from vllm_gateway.engine.main import main  # the only place the gateway CLI reaches vLLM

    return main(argv)


def runpod_main(argv: list[str]) -> int:
    from vllm_gateway.gateway.runpod.worker import main

    return main(argv)


def bake_main(argv: list[str]) -> int:
    from vllm_gateway.engine.bake import main

    return main(argv)


def keys_main(argv: list[str]) -> int:
    from vllm_gateway.protocol.transport import create_keys

    p = argparse.ArgumentParser(prog="vllm-gateway keys", description=(
        "Make ZeroMQ CURVE certificates for tcp:// engines across hosts: NAME.key (public, "
        "give it to the other side) and NAME.key_secret (keep it)."))
    p.add_argument("directory")
    p.add_argument("--name", default="engine", help="engine, or a gateway's name")
    ns = p.parse_args(argv)
    public, secret = create_keys(ns.directory, ns.name)
    print(f"public: {public}\nsecret: {secret}")
    return 0


COMMANDS = {"serve": serve_main, "engine": engine_main, "http": http_main, "runpod": runpod_main,
            "bake": bake_main, "keys": keys_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print("\nusage: vllm-gateway {serve,engine,http,runpod,bake,keys} [options]   (--help on each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    return COMMANDS[argv[0]](argv[1:])
