"""Starting engine processes from the gateway side, and `vllm-gateway serve`.

`EngineProcesses` starts engine children on private ipc:// sockets and stops them;
`wait_engines_ready` blocks until each answers ready over the protocol (or one
exits, with its exit code as the reason). `launch` is `vllm-gateway serve`: an
engine and the HTTP gateway as child processes, stopped together on Ctrl-C /
SIGTERM.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import zmq

from protocol.messages import EngineStatus, Hello, decode_engine_message, encode

log = logging.getLogger("gateway.launcher")

POLL_S = 0.5
STOP_TIMEOUT_S = 30
PR_SET_PDEATHSIG = 1


class EngineStartFailed(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so that a
    killed gateway never leaves an engine holding a GPU."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The children must find this project's packages however it was installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`python -m <args>` as a child that dies with us."""
    return subprocess.Popen([sys.executable, "-m", *args], env=env, preexec_fn=_die_with_parent)


def stop_processes(procs: list[subprocess.Popen], timeout: float = STOP_TIMEOUT_S) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %d s; killing it", p.pid, timeout)
            p.kill()
            p.wait()


class EngineProcesses:
    """Engine child processes, each bound to its own ipc:// socket in a private
    directory."""

    def __init__(self, engine_argv: list[str], count: int = 1) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="vllm-gateway-")
        self.endpoints = [f"ipc://{self.run_dir}/engine-{i}" for i in range(count)]
        env = child_env()
        self.procs = [
            spawn(["engine", "--endpoint", ep, "--engine-id", str(i), *engine_argv], env)
            for i, ep in enumerate(self.endpoints)
        ]
        log.info("started %d engine process(es): pid %s", count, ", ".join(str(p.pid) for p in self.procs))

    def exited(self) -> list[tuple[int, int]]:
        """(engine index, exit code) of every engine that is no longer running."""
        return [(i, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]

    def stop(self) -> None:
        stop_processes(self.procs)
        try:
            os.rmdir(self.run_dir)
        except OSError:
            pass


def wait_engines_ready(endpoints: list[str], engines: EngineProcesses | None, timeout: float) -> list[EngineStatus]:
    """Block until every endpoint answers `ready`; raise `EngineStartFailed` if an
    engine process exits first, reports failure, or `timeout` passes."""
    ctx = zmq.Context()
    socks = []
    for ep in endpoints:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        socks.append(s)
    ready: dict[int, EngineStatus] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(ready) < len(socks):
            if engines is not None and engines.exited():
                i, code = engines.exited()[0]
                raise EngineStartFailed(f"engine {i} exited with code {code} before it was ready (see its log above)")
            if time.monotonic() > deadline:
                raise EngineStartFailed(f"engines not ready after {timeout:.0f} s: {sorted(set(range(len(socks))) - set(ready))}")
            for i, s in enumerate(socks):
                if i in ready:
                    continue
                s.send(encode(Hello("launcher")))
                while s.poll(int(POLL_S * 1000 / len(socks))):
                    msg = decode_engine_message(s.recv())
                    if isinstance(msg, EngineStatus) and msg.state == "ready":
                        ready[i] = msg
                    elif isinstance(msg, EngineStatus) and msg.state == "failed":
                        raise EngineStartFailed(f"engine {i} failed: {msg.error or 'no reason given'}")
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    return [ready[i] for i in range(len(socks))]


# ------------------------------------------------------------ vllm-gateway serve


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def launch(host: str, port: int, engine_argv: list[str]) -> int:
    started = time.monotonic()
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    engines = EngineProcesses(engine_argv)
    http = spawn(["gateway", "http", "--host", host, "--port", str(port),
                  "--engine-endpoints", ",".join(engines.endpoints)], child_env())
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log.info("HTTP gateway: pid %d", http.pid)

    ready = False
    code = 0
    try:
        while not stopping:
            if http.poll() is not None or engines.exited():
                name = "HTTP gateway" if http.poll() is not None else f"engine {engines.exited()[0][0]}"
                log.error("the %s exited (code %s); stopping", name,
                          http.returncode if http.poll() is not None else engines.exited()[0][1])
                code = 1
                break
            if not ready and _healthy(url + "/health"):
                ready = True
                log.info("ready in %.1f s: OpenAI API at %s/v1 (Ctrl-C to stop)", time.monotonic() - started, url)
            time.sleep(POLL_S)
    finally:
        log.info("stopping")
        # Stop taking requests first, then the engines.
        stop_processes([http])
        engines.stop()
        failed = [p.returncode for p in [http, *engines.procs] if p.returncode not in (0, -signal.SIGTERM)]
        if failed and code == 0:
            log.error("a child process exited with an error while stopping: %s", failed)
            code = 1
    return code
