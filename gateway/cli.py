"""`vllm-gateway`: serve | engine | http | runpod | bake | keys.

- `serve`: engine(s) and the HTTP gateway as separate processes, in one command.
- `engine`: one engine process alone (for supervisord/systemd).
- `http`: the HTTP gateway alone, in front of engines started elsewhere.
- `runpod`: a RunPod serverless worker: engine(s) plus the RunPod job handler.
- `bake`: download (or convert) the configured model into BASE_PATH, for images.
- `keys`: make CURVE key pairs for engines reached over tcp:// from other hosts.

The command line sits on top of everything: it composes the supervisor (which
starts engine processes), the intakes and the table of operations (gateway/api.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading



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
    from vllm_gateway.gateway.api import operations
    from vllm_gateway.gateway.config import GatewaySettings
    from vllm_gateway.gateway.http.server import serve

    p = _http_parser("vllm-gateway http")
    p.add_argument("--engine-endpoints", default=None,
                   help="comma-separated ZeroMQ endpoints of the engines (ENGINE_ENDPOINTS)")
    ns = p.parse_args(argv)
    env = dict(os.environ)
    if ns.engine_endpoints:  # the flag wins, and whatever follows from it (the default request cap)
        env["ENGINE_ENDPOINTS"] = ns.engine_endpoints
    try:
        settings = GatewaySettings.from_env(env)
    except ValueError as e:
        logging.getLogger("gateway").error("bad setting: %s", e)
        return 2
    settings = dataclasses.replace(settings, host=ns.host or settings.host, port=ns.port or settings.port)
    serve(settings, operations())
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
    """`vllm-gateway runpod [runpod SDK flags] [engine flags]`: start the engines
    (unless ENGINE_ENDPOINTS names running ones), wait until they are ready, then
    take jobs with the RunPod SDK in this process."""
    import runpod

    from vllm_gateway.gateway.api import operations
    from vllm_gateway.gateway.config import RunPodSettings
    from vllm_gateway.gateway.runpod import worker
    from vllm_gateway.gateway.supervisor.launcher import EngineProcesses, EngineStartFailed, wait_engines_ready

    log = logging.getLogger("gateway.runpod")
    try:
        settings = RunPodSettings.from_env()
    except ValueError as e:
        log.error("bad setting: %s", e)
        return 2
    # The SDK reads its own flags (--rp_serve_api, --test_input, ...) from sys.argv;
    # everything else is for the engines.
    _, engine_argv = runpod.serverless.parser.parse_known_args(argv)
    engines = None
    if settings.own_engines:
        try:
            engines = EngineProcesses(engine_argv)
        except ValueError as e:
            log.error("bad setting: %s", e)
            return 2
        settings.engine_endpoints = engines.endpoints
    # Until the SDK takes over (it handles SIGTERM itself), a stop while the
    # engines load is a normal stop: exit 0, engines stopped on the way out.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        try:
            statuses = wait_engines_ready(settings.engine_endpoints, engines,
                                          settings.engine_start_timeout_s, stop.is_set)
        except EngineStartFailed as e:
            if stop.is_set():
                log.info("stopped before the engines were ready")
                return 0
            log.error("the worker cannot start: %s", e)
            return e.exit_code
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("engines ready (model %s); starting the RunPod worker, concurrency %d",
                 statuses[0].model, settings.max_concurrency)
        if engines is not None:
            engines.supervise_in_thread()  # a dead engine is restarted; its jobs fail meanwhile
        worker.run(settings, operations(), argv)
        return 0
    finally:
        if engines is not None:
            engines.stop()


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
