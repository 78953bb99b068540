"""`vllm-gateway serve`: start the engine and the HTTP gateway as child processes,
wait until the gateway reports healthy, and stop both on Ctrl-C / SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

log = logging.getLogger("gateway.launcher")

POLL_S = 0.5
STOP_TIMEOUT_S = 30


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=env)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %d s; killing it", p.pid, STOP_TIMEOUT_S)
            p.kill()
            p.wait()


def launch(host: str, port: int, engine_argv: list[str]) -> int:
    started = time.monotonic()
    run_dir = tempfile.mkdtemp(prefix="vllm-gateway-")
    endpoint = f"ipc://{run_dir}/engine-0"
    env = dict(os.environ)
    # The children must find this project's packages however it was installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    engine = _child(["engine", "--endpoint", endpoint, "--engine-id", "0", *engine_argv], env)
    http = _child(["gateway", "http", "--host", host, "--port", str(port), "--engine-endpoints", endpoint], env)
    procs = [http, engine]  # stop order: stop taking requests first
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log.info("starting engine (pid %d) and HTTP gateway (pid %d)", engine.pid, http.pid)

    ready = False
    code = 0
    try:
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                p = dead[0]
                name = "engine" if p is engine else "HTTP gateway"
                log.error("the %s exited with code %s; stopping", name, p.returncode)
                code = 1
                break
            if not ready and _healthy(url + "/health"):
                ready = True
                log.info("ready in %.1f s: OpenAI API at %s/v1 (Ctrl-C to stop)", time.monotonic() - started, url)
            time.sleep(POLL_S)
    finally:
        log.info("stopping")
        _stop(procs)
        failed = [p for p in procs if p.returncode not in (0, -signal.SIGTERM)]
        if failed and code == 0:
            log.error("a child process exited with an error while stopping: %s", [p.returncode for p in failed])
            code = 1
        try:
            os.rmdir(run_dir)
        except OSError:
            pass
    return code
