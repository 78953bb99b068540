"""What the tests share: the checkout, the model, child processes and their logs,
free ports, waiting for health and idleness, Prometheus scrapes, streamed reads,
and the requests several test files send. Fixtures live in conftest.py; no test
file imports another."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import zmq
from prometheus_client.parser import text_string_to_metric_families

from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus, Hello, decode_engine_message, encode

ROOT = Path(__file__).resolve().parents[2]
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


@contextlib.contextmanager
def serving(name: str, env: dict[str, str], run_dir: Path):
    """`vllm-gateway serve` on a free port with `env`, once healthy: (its URL, its
    process); stopped afterwards."""
    port = free_port()
    proc = Proc(name, ["vllm_gateway.gateway", "serve", "--port", str(port)], env, run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], ENGINE_START_TIMEOUT_S)
        yield url, proc
    finally:
        proc.stop()


@contextlib.contextmanager
def engine_socket(endpoint: str):
    """A DEALER connected to an engine, as a gateway's (closed after)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def engine_running(endpoint: str) -> int:
    """Ask the engine itself (over the protocol) how many requests it runs."""
    with engine_socket(endpoint) as sock:
        sock.send(encode(Hello("test-probe", PROTOCOL_VERSION)))
        assert sock.poll(5000), "engine did not answer"
        msg = decode_engine_message(sock.recv())
        assert isinstance(msg, EngineStatus)
        return msg.running + msg.waiting


def wait_idle(endpoint: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_running(endpoint) == 0:
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------- metrics


def scrape(url: str) -> list:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(url: str, name: str, target: float, timeout: float = 10, **labels: str) -> list:
    """Engines report once a second: scrape until `name` reaches `target`."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if value(samples, name, **labels) >= target or time.monotonic() > deadline:
            return samples
        time.sleep(0.3)


# ------------------------------------------------------------ streams, health


class Stream(threading.Thread):
    """One streamed completion, read to its end in a thread."""

    def __init__(self, url: str, max_tokens: int, prompt: str = "Tell me a long story:", model: str = MODEL) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                     "stream": True, "ignore_eos": True}
        self.events: list[dict | str] = []
        self.error_at: float | None = None
        self.status = 0
        self.refusal = ""  # the body of an answer other than 200
        self.exc: BaseException | None = None  # what the client raised
        self.started = time.monotonic()
        self.first_at: float | None = None  # the first token's arrival
        self._closing = False
        self.start()

    def __repr__(self) -> str:
        first = f"{self.first_at - self.started:.2f} s" if self.first_at else "none"
        return (f"<Stream status={self.status} tokens={self.tokens} first token after {first} "
                f"last={self.events[-2:]} refusal={self.refusal[:300]!r} exc={self.exc!r}>")

    def close(self) -> None:
        """Stop reading: the connection closes (the client goes away)."""
        self._closing = True
        self.join(30)

    def run(self) -> None:
        try:
            self._read()
        except BaseException as e:  # noqa: BLE001 - kept for the test's message
            self.exc = e

    def _read(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=300) as r:
            self.status = r.status_code
            if r.status_code != 200:
                self.refusal = r.read().decode(errors="replace")
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                event = data if data == "[DONE]" else json.loads(data)
                if isinstance(event, dict) and "error" in event and self.error_at is None:
                    self.error_at = time.monotonic()
                if self.first_at is None and isinstance(event, dict) and event.get("choices"):
                    self.first_at = time.monotonic()
                self.events.append(event)
                if self._closing:
                    return

    @property
    def tokens(self) -> int:
        return sum(1 for e in self.events if isinstance(e, dict) and e.get("choices"))

    @property
    def intact(self) -> bool:
        finish = [e["choices"][0]["finish_reason"] for e in self.events if isinstance(e, dict) and e.get("choices")]
        return bool(finish) and finish[-1] == "length" and self.events[-1] == "[DONE]" and self.error_at is None

    @property
    def failed(self) -> bool:
        return self.error_at is not None and self.events[-1] == "[DONE]"

    @property
    def under_way(self) -> bool:
        """Tokens coming, not yet ended."""
        return self.is_alive() and self.tokens > 0


def health(url: str) -> tuple[int, dict]:
    r = httpx.get(url + "/health", timeout=5)
    return r.status_code, r.json()


def wait_until(check, timeout: float, what: str, proc: Proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive(), proc.tail()
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{proc.tail()}")


# ------------------------------------------------------------ shared requests


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def stream_chat(client, **kw):
    """A streamed chat reassembled as a client does: content, reasoning, tool calls
    by index (id and name from their first piece, arguments joined), the last
    finish reason and the usage."""
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning", None) or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or tc.id
                if tc.function is not None:
                    call["name"] = call["name"] or tc.function.name
                    call["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish, usage


# ---------------------------------------------------------------- LoRA adapters


def make_adapter(folder, seed: int) -> str:
    """A LoRA adapter for the embedded model, with non-zero weights (peft's
    default starts B at zero, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vllm_gateway.engine.default_model import ensure

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(ensure(None), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return str(folder)
