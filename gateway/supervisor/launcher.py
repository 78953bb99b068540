"""Starting engine processes from the gateway side, and `vllm-gateway serve`.

`plan_engines` decides how many engines run and on which devices (one per GPU
group, or a share of the CPU cores each); `EngineProcesses` starts them on private
ipc:// sockets, restarts one that dies (with backoff) and stops them;
`wait_engines_ready` blocks until each answers ready over the protocol (or one
exits, with its exit code as the reason). `launch` is `vllm-gateway serve`: the
engines and the HTTP gateway as child processes; on Ctrl-C / SIGTERM the gateway
drains, then everything stops.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from vllm_gateway.gateway.config import GatewaySettings
from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus, Hello, decode_engine_message, encode
from vllm_gateway.protocol.transport import secure_client

log = logging.getLogger("gateway.supervisor.launcher")

POLL_S = 0.5
STOP_TIMEOUT_S = 30
PR_SET_PDEATHSIG = 1
# A dead engine is restarted after 1, 2, 4, ... up to 60 s; an engine that ran
# for 2 minutes before dying starts over at 1 s.
RESTART_BACKOFF_MIN_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
RESTART_BACKOFF_RESET_S = 120.0


class EngineStartFailed(RuntimeError):
    """The engines did not come up. `exit_code` is what the command should exit
    with: 2 when an engine refused its settings (as it does itself with 2), else 1."""

    def __init__(self, message: str, engine_exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = 2 if engine_exit_code == 2 else 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so that a
    killed gateway never leaves an engine holding a GPU."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_env() -> dict[str, str]:
    """Children run with our environment and interpreter: they find this project
    where we did (it is installed; nothing is put on PYTHONPATH)."""
    return dict(os.environ)


def spawn(args: list[str], env: dict[str, str], cpus: set[int] | None = None,
          own_group: bool = False) -> subprocess.Popen:
    """`python -m <args>` as a child that dies with us (and runs on `cpus` only;
    with `own_group`, leads a process group of its own: see `kill_group`)."""
    def setup() -> None:
        _die_with_parent()
        if own_group:
            os.setpgrp()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen([sys.executable, "-m", *args], env=env, preexec_fn=setup)


def kill_group(p: subprocess.Popen) -> None:
    """Kill what is left of a process group led by `p`. An engine killed outright
    (SIGKILL, the OOM killer) leaves vLLM's engine-core and worker processes
    behind, holding the model's memory (on a GPU, the GPU's): a restart would not
    fit. They share the engine's process group, so they go with it."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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


@dataclasses.dataclass
class EngineSlot:
    """Where one engine runs: its endpoint, the devices it alone may use."""

    index: int
    endpoint: str
    env: dict[str, str]  # CUDA_VISIBLE_DEVICES, or the CPU cores for vLLM's OpenMP threads
    cpus: set[int] | None = None  # CPU affinity of the whole engine process (CPU engines)


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else nvidia-smi),
    found without importing torch."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(line for line in out.stdout.splitlines() if line.startswith("GPU "))]


def placement_settings(env: Mapping[str, str], engine_argv: list[str]) -> dict[str, Any]:
    """The few engine settings that decide placement, as the engine will read them
    (its flag over its variable). The engine checks all of its settings itself when
    it starts; the supervisor forwards them untouched and does not import it."""
    p = argparse.ArgumentParser(add_help=False)
    for name in ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "DISTRIBUTED_EXECUTOR_BACKEND"):
        p.add_argument("--" + name.lower().replace("_", "-"), dest=name, default=None)
    ns, _ = p.parse_known_args(engine_argv)
    out: dict[str, Any] = {}
    for name, value in vars(ns).items():
        raw = value if value is not None else env.get(name) or None
        if name == "DISTRIBUTED_EXECUTOR_BACKEND":
            out[name] = raw
            continue
        try:
            out[name] = int(raw) if raw is not None else 1
        except ValueError:
            raise ValueError(f"{name}={raw!r}: not a whole number") from None
        if out[name] < 1:
            raise ValueError(f"{name}={raw!r}: must be >= 1")
    return out


def plan_engines(env: Mapping[str, str], engine_argv: list[str], run_dir: str,
                 gpus: list[str] | None = None, cpus: list[int] | None = None) -> list[EngineSlot]:
    """One engine per group of TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE GPUs
    (NUM_ENGINES, or as many groups as there are GPUs). On CPU, NUM_ENGINES
    engines (default 1), each on its own share of the cores. With Ray the engine
    spans nodes: one engine, devices left to Ray."""
    settings = placement_settings(env, engine_argv)
    group = settings["TENSOR_PARALLEL_SIZE"] * settings["PIPELINE_PARALLEL_SIZE"]
    requested = env.get("NUM_ENGINES")
    if requested is not None and (not requested.isdigit() or int(requested) < 1):
        raise ValueError(f"NUM_ENGINES={requested!r}: a whole number >= 1")
    endpoint = lambda i: f"ipc://{run_dir}/engine-{i}"  # noqa: E731
    if settings.get("DISTRIBUTED_EXECUTOR_BACKEND") == "ray":
        return [EngineSlot(i, endpoint(i), {}) for i in range(int(requested or 1))]
    gpus = visible_gpus(env) if gpus is None else gpus
    if gpus:
        n = int(requested) if requested else max(1, len(gpus) // group)
        if n * group > len(gpus):
            raise ValueError(f"{n} engine(s) x {group} GPU(s) each need {n * group} GPUs; {len(gpus)} visible ({','.join(gpus)})")
        return [EngineSlot(i, endpoint(i), {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * group:(i + 1) * group])})
                for i in range(n)]
    n = int(requested or 1)
    if n == 1:
        return [EngineSlot(0, endpoint(0), {})]
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    if n > len(cpus):
        raise ValueError(f"NUM_ENGINES={n} CPU engines need at least {n} cores; {len(cpus)} available")
    per, extra = divmod(len(cpus), n)
    slots, start = [], 0
    for i in range(n):
        share = cpus[start:start + per + (1 if i < extra else 0)]
        start += len(share)
        slots.append(EngineSlot(i, endpoint(i), {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share))}, set(share)))
    return slots


_PER_ENGINE = re.compile(r"^ENGINE_(\d+)_(\w+)$")


def engine_env(env: dict[str, str], index: int) -> dict[str, str]:
    """The environment of engine `index`: everyone's, with its own settings on top
    (`ENGINE_1_MODEL_NAME=...`, `ENGINE_1_ENGINE_TASK=embed`: one box serving a
    chat model and an embedding model)."""
    out = dict(env)
    for key, value in env.items():
        m = _PER_ENGINE.match(key)
        if m is not None and int(m.group(1)) == index:
            out[m.group(2)] = value
    return out


class EngineProcesses:
    """Engine child processes, one per slot, each on its own ipc:// socket in a
    private directory. `poll()` restarts an engine that died, with backoff; an
    engine that dies before it was ever ready is a configuration error, not a
    crash, and raises `EngineStartFailed`."""

    def __init__(self, engine_argv: list[str], env: Mapping[str, str] = os.environ) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="vllm-gateway-")
        self.engine_argv = engine_argv
        self.slots = plan_engines(env, engine_argv, self.run_dir)
        self.endpoints = [s.endpoint for s in self.slots]
        self.procs: list[subprocess.Popen] = [self._spawn(s) for s in self.slots]
        self.started = [time.monotonic()] * len(self.slots)
        self.ever_ready = [False] * len(self.slots)
        self.restart_at: list[float | None] = [None] * len(self.slots)
        self.backoff = [RESTART_BACKOFF_MIN_S] * len(self.slots)
        self.stopping = False
        self._lock = threading.Lock()

    def _spawn(self, slot: EngineSlot) -> subprocess.Popen:
        env = engine_env(child_env(), slot.index)
        for k, v in slot.env.items():
            if k == "VLLM_CPU_OMP_THREADS_BIND" and k in env:
                continue  # the operator's own binding wins
            env[k] = v
        args = ["vllm_gateway.engine", "--endpoint", slot.endpoint, "--engine-id", str(slot.index), *self.engine_argv]
        p = spawn(args, env, cpus=slot.cpus, own_group=True)
        where = ", ".join(f"{k}={v}" for k, v in slot.env.items())
        log.info("engine %d: pid %d%s", slot.index, p.pid, f" ({where})" if where else "")
        return p

    def mark_ready(self) -> None:
        self.ever_ready = [True] * len(self.slots)

    def exited(self) -> list[tuple[int, int]]:
        """(engine index, exit code) of every engine that is not running now."""
        return [(i, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]

    def poll(self) -> None:
        with self._lock:
            if self.stopping:
                return
            now = time.monotonic()
            for i, code in self.exited():
                if not self.ever_ready[i]:
                    raise EngineStartFailed(f"engine {i} exited with code {code} before it was ready (see its log above)",
                                            code)
                at = self.restart_at[i]
                if at is None:
                    kill_group(self.procs[i])
                    if now - self.started[i] > RESTART_BACKOFF_RESET_S:
                        self.backoff[i] = RESTART_BACKOFF_MIN_S
                    delay = self.backoff[i]
                    self.backoff[i] = min(delay * 2, RESTART_BACKOFF_MAX_S)
                    self.restart_at[i] = now + delay
                    log.error("engine %d (pid %d) exited with code %s; restarting it in %.0f s",
                              i, self.procs[i].pid, code, delay)
                elif now >= at:
                    self.restart_at[i] = None
                    self.started[i] = now
                    self.procs[i] = self._spawn(self.slots[i])

    def supervise_in_thread(self) -> threading.Thread:
        """Keep the engines running from a daemon thread (for the RunPod worker,
        whose main thread belongs to the SDK)."""
        def loop() -> None:
            while not self.stopping:
                try:
                    self.poll()
                except EngineStartFailed as e:
                    log.error("%s", e)
                time.sleep(POLL_S)

        t = threading.Thread(target=loop, name="engine-supervisor", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
        stop_processes(self.procs)
        for p in self.procs:
            kill_group(p)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def wait_engines_ready(endpoints: list[str], engines: EngineProcesses | None, timeout: float,
                       should_stop: Callable[[], bool] = lambda: False) -> list[EngineStatus]:
    """Block until every endpoint answers `ready`; raise `EngineStartFailed` if an
    engine process exits first, reports failure, `timeout` passes or `should_stop`."""
    ctx = zmq.Context()
    socks = []
    for ep in endpoints:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        secure_client(s)
        s.connect(ep)
        socks.append(s)
    ready: dict[int, EngineStatus] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(ready) < len(socks):
            if engines is not None and (dead := engines.exited()):
                i, code = dead[0]
                raise EngineStartFailed(f"engine {i} exited with code {code} before it was ready (see its log above)",
                                        code)
            if should_stop():
                raise EngineStartFailed("stopped while waiting for the engines")
            if time.monotonic() > deadline:
                raise EngineStartFailed(f"engines not ready after {timeout:.0f} s: {sorted(set(range(len(socks))) - set(ready))}")
            for i, s in enumerate(socks):
                if i in ready:
                    continue
                s.send(encode(Hello("launcher", PROTOCOL_VERSION)))
                while i not in ready and s.poll(int(POLL_S * 1000 / len(socks))):
                    msg = decode_engine_message(s.recv())
                    if isinstance(msg, EngineStatus) and msg.protocol_version != PROTOCOL_VERSION:
                        raise EngineStartFailed(f"engine {i} speaks protocol version {msg.protocol_version}, "
                                                f"this launcher {PROTOCOL_VERSION}")
                    if isinstance(msg, EngineStatus) and msg.state == "ready":
                        ready[i] = msg
                    elif isinstance(msg, EngineStatus) and msg.state == "failed":
                        raise EngineStartFailed(f"engine {i} failed: {msg.error or 'no reason given'}")
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    if engines is not None:
        engines.mark_ready()
    return [ready[i] for i in range(len(socks))]


# ------------------------------------------------------------ vllm-gateway serve


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def launch(host: str | None, port: int | None, engine_argv: list[str], num_engines: str | None = None) -> int:
    """`vllm-gateway serve`; the flags given (host, port, --num-engines) win over
    their environment variables."""
    started = time.monotonic()
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        settings = GatewaySettings.from_env()
        host, port = host or settings.host, port or settings.port
        env = dict(os.environ, NUM_ENGINES=num_engines) if num_engines is not None else os.environ
        engines = EngineProcesses(engine_argv, env)
    except ValueError as e:
        log.error("bad setting: %s", e)
        return 2
    http = spawn(["vllm_gateway.gateway", "http", "--host", host, "--port", str(port),
                  "--engine-endpoints", ",".join(engines.endpoints)], child_env())
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log.info("HTTP gateway: pid %d", http.pid)

    code = 0
    try:
        wait_engines_ready(engines.endpoints, engines, settings.engine_start_timeout_s,
                           lambda: stopping or http.poll() is not None)
        while not stopping and http.poll() is None and not _healthy(url + "/health"):
            time.sleep(0.1)
        if not stopping and http.poll() is None:
            log.info("ready in %.1f s: OpenAI API at %s/v1 (Ctrl-C to stop)", time.monotonic() - started, url)
        while not stopping and http.poll() is None:
            engines.poll()
            time.sleep(POLL_S)
        if http.poll() is not None:
            log.error("the HTTP gateway exited (code %s); stopping", http.returncode)
            code = 1
    except EngineStartFailed as e:
        if not stopping:
            log.error("%s; stopping", e)
            code = e.exit_code
    finally:
        log.info("stopping")
        # The gateway drains first (new requests get 503, running ones finish), then the engines stop.
        stop_processes([http], timeout=settings.drain_timeout_s + 15)
        engines.stop()
        # A stop is judged by the gateway's drain alone: engines may be loading,
        # waiting for a restart or dead when it comes, and stopping them is the point.
        if http.returncode not in (0, -signal.SIGTERM) and code == 0:
            log.error("the HTTP gateway exited with code %s while stopping", http.returncode)
            code = 1
    return code
