"""A replica that sheds honestly and loses nothing, without vLLM: admission and
slow clients against the synthetic engine (it speaks the real protocol), the
engine client under a saturated event loop, stored responses, settings that
fail closed. tests/integration/test_reliability.py has the real-engine side."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import msgspec
import pytest
import zmq
import zmq.asyncio

from support import ROOT, Proc, child_env, free_port, wait_healthy
from vllm_gateway.gateway.config import GatewaySettings
from vllm_gateway.gateway.engines.client import EngineClient, Unencodable
from vllm_gateway.gateway.responses import serving
from vllm_gateway.gateway.responses.schemas import Response
from vllm_gateway.gateway.responses.store import ResponseStore
from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus, Generate, SamplingParams, TextPrompt
from vllm_gateway.protocol.transport import InsecureEndpoint, check_client_endpoints


@pytest.fixture()
def synthetic(run_dir, request):
    """A synthetic engine (fast steps) and a gateway in front of it, with the
    gateway settings the test names (`@pytest.mark.parametrize('synthetic', [env], indirect=True)`)."""
    env = dict(getattr(request, "param", {}))
    # A fast talker: 1,000 tokens a step, 200 steps a second (several MB/s), so that a
    # client that reads nothing fills the kernel's buffers in seconds.
    tokens = env.pop("TOKENS_PER_STEP", "1")
    endpoint = f"ipc://{run_dir}/synthetic-rel-{free_port()}"
    engine = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"),
                               "--endpoint", endpoint, "--step-ms", "5", "--tokens-per-step", tokens], env=child_env())
    port = free_port()
    gateway = Proc(f"gateway-rel-{port}", ["vllm_gateway.gateway", "http", "--port", str(port),
                                            "--engine-endpoints", endpoint], child_env(**env), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [gateway], 60)
        yield url, gateway
    finally:
        gateway.stop()
        engine.kill()
        engine.wait()


def in_flight(url: str) -> int:
    return sum(e["in_flight"] for e in httpx.get(url + "/health").json()["engines"])


# ------------------------------------------------------------------- admission


@pytest.mark.parametrize("synthetic", [{"MAX_CONCURRENT_REQUESTS": "2"}], indirect=True)
def test_beyond_the_cap_a_fast_429_in_the_routes_shape(synthetic):
    url, _ = synthetic
    streams = [httpx.stream("POST", url + "/v1/completions", timeout=60, json={
        "model": "synthetic", "prompt": "x", "max_tokens": 100_000, "stream": True}) for _ in range(2)]
    opened = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened)
        started = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "MAX_CONCURRENT_REQUESTS" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/messages", json={"model": "synthetic", "max_tokens": 5,
                                                   "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert r.status_code == 429 and r.json() == {"type": "error", "error": {
            "type": "rate_limit_error", "message": r.json()["error"]["message"]}}
        # what reaches no engine is not limited
        assert httpx.get(url + "/health").status_code == 200
        assert in_flight(url) == 2
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    # the places are free again
    deadline = time.monotonic() + 5
    while in_flight(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(url + "/v1/completions", json={"model": "synthetic", "prompt": "x", "max_tokens": 3}, timeout=10)
    assert r.status_code == 200


# --------------------------------------------------------------- slow clients


def never_reading(url: str) -> socket.socket:
    """A client that asks for an endless stream and reads nothing of it, with a
    small receive window so that the server's writes block soon."""
    body = json.dumps({"model": "synthetic", "prompt": "x", "max_tokens": 10_000_000, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def run_until_cut(url: str, timeout: float = 60) -> None:
    """The stream starts, then ends (the gateway cut it) within `timeout`."""
    deadline = time.monotonic() + timeout
    while in_flight(url) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(url) == 1, "the stream did not start"
    while in_flight(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert in_flight(url) == 0, "the stream of a client that reads nothing still runs"


@pytest.mark.parametrize("synthetic", [{"STREAM_WRITE_TIMEOUT_S": "2", "STREAM_MAX_UNSENT": "0",
                                                "TOKENS_PER_STEP": "1000"}], indirect=True)
def test_a_client_that_stops_reading_is_cut_and_its_engine_request_aborted(synthetic):
    url, gateway = synthetic
    sock = never_reading(url)
    try:
        # never read: within the write timeout (plus the time to fill the buffers), the
        # stream is ended and the engine request aborted
        run_until_cut(url)
        assert "ending a stream: the client read nothing" in gateway.tail(200)
        # the connection is closed: reading drains what was sent, then ends
        sock.settimeout(10)
        while sock.recv(65536):
            pass
    finally:
        sock.close()


@pytest.mark.parametrize("synthetic", [{"STREAM_WRITE_TIMEOUT_S": "0", "STREAM_MAX_UNSENT": "500",
                                                "TOKENS_PER_STEP": "1000"}], indirect=True)
def test_output_piling_up_unsent_is_capped(synthetic):
    url, gateway = synthetic
    sock = never_reading(url)
    try:
        run_until_cut(url)
        assert "engine outputs waited unsent for the client (STREAM_MAX_UNSENT)" in gateway.tail(200)
    finally:
        sock.close()


# ------------------------------------------------ a busy gateway, healthy engines


def test_a_blocked_gateway_loop_does_not_declare_a_working_engine_dead(run_dir):
    """The gateway's own loop held up for longer than the engine timeout (its CPU
    saturated) while an engine streams: the stream goes on whole."""
    endpoint = f"ipc://{run_dir}/synthetic-busy"
    engine = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "synthetic_engine.py"),
                               "--endpoint", endpoint, "--step-ms", "10"], env=child_env())

    async def scenario() -> str:
        client = EngineClient([endpoint], engine_timeout_s=1.0)
        await client.start()
        try:
            assert await client.wait_ready(30)
            gen = Generate("r1", TextPrompt("x"), SamplingParams(max_tokens=300), model="synthetic")
            stream = client.submit([gen])
            text = []
            first = await stream.next()
            text += [d.text for d in first]
            time.sleep(2.5)  # the loop blocked: no heartbeat, no reading, for 2.5 engine timeouts
            while (batch := await stream.next()) is not None:
                text += [d.text for d in batch]
            return "".join(text)
        finally:
            await client.close()

    try:
        assert asyncio.run(scenario()) == ("0123456789" * 30)
    finally:
        engine.kill()
        engine.wait()


# ------------------------------------------------------------- stored responses


def _response(rid: str, status: str = "completed") -> Response:
    return Response(id=rid, created_at=0, model="m", status=status)


def test_store_eviction_never_drops_running_background_responses():
    async def scenario() -> None:
        store = ResponseStore(size=2, ttl_s=0.2)
        forever = asyncio.get_running_loop().create_future()
        running = store.put(_response("bg", "in_progress"), [], task=asyncio.ensure_future(forever))
        store.put(_response("a"), [])
        store.put(_response("b"), [])
        store.put(_response("c"), [])  # over the size: finished ones go, oldest first
        assert store.get("bg") is running and store.get("a") is None and store.get("c") is not None
        await asyncio.sleep(0.3)  # past the TTL: the finished expire, the running one stays
        assert store.get("c") is None and store.get("bg") is running
        assert not forever.cancelled()
        forever.cancel()

    asyncio.run(scenario())


def test_stored_responses_belong_to_their_key():
    store = ResponseStore(10, 60)
    store.put(_response("mine"), [], owner="key-a")
    assert store.get("mine", "key-a") is not None
    assert store.get("mine", "key-b") is None and store.get("mine") is None
    assert not store.delete("mine", "key-b") and store.get("mine", "key-a") is not None
    assert store.delete("mine", "key-a")


class _Refusing:
    """An engine client whose submit finds a value the wire cannot carry."""

    def submit(self, gens, exact=False):
        raise Unencodable("int too big to convert")


def _prepared(store: ResponseStore) -> serving.Prepared:
    from vllm_gateway.gateway.responses.schemas import ResponsesRequest

    req = msgspec.convert({"input": "hi", "background": True, "store": True}, ResponsesRequest)
    return serving.prepare(req, "m", store)


def test_a_background_response_whose_submission_fails_ends_failed_and_can_be_cancelled():
    async def scenario() -> None:
        store = ResponseStore(10, 60)
        queued = serving.start_background(_Refusing(), _prepared(store), store, 0)
        assert queued.status == "queued"
        for _ in range(50):
            await asyncio.sleep(0.01)
            if serving.fetch(store, queued.id).status != "in_progress":
                break
        failed = serving.fetch(store, queued.id)
        assert failed.status == "failed" and failed.error is not None and "value out of range" in failed.error.message
        again = await serving.cancel(store, queued.id)  # no error re-raised
        assert again.status == "failed"

    asyncio.run(scenario())


def test_a_stopping_gateway_fails_running_background_responses():
    class Stuck:
        def submit(self, gens, exact=False):
            return _Never()

        def release(self, stream, *, abort):
            pass

    async def scenario() -> None:
        store = ResponseStore(10, 60)
        queued = serving.start_background(Stuck(), _prepared(store), store, 0)
        await asyncio.sleep(0.05)
        assert serving.fetch(store, queued.id).status == "in_progress"
        assert await serving.fail_running(store, "the gateway stopped") == 1
        stopped = serving.fetch(store, queued.id)
        assert stopped.status == "failed" and stopped.error.message == "the gateway stopped"

    asyncio.run(scenario())


class _Never:
    finished = False
    pending = False

    async def next(self):
        await asyncio.get_running_loop().create_future()

    def interrupt(self, error):
        pass


# -------------------------------------------------------------------- settings


@pytest.mark.parametrize("env", [{"API_KEY": ","}, {"VLLM_API_KEY": " , "}, {"API_KEY_FILE": "EMPTY"}])
def test_keys_fail_closed(env, tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# no key here\n\n")
    env = {k: (str(empty) if v == "EMPTY" else v) for k, v in env.items()}
    with pytest.raises(ValueError, match="holds no key"):
        GatewaySettings.from_env(env)
    r = subprocess.run([sys.executable, "-m", "vllm_gateway.gateway", "http", "--port", str(free_port())],
                       env=child_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "holds no key" in r.stderr, r.stderr


def test_no_plaintext_to_engines_beyond_this_host():
    check_client_endpoints(["ipc:///tmp/e", "tcp://127.0.0.1:5555"], {})
    with pytest.raises(InsecureEndpoint, match="ENGINE_ALLOW_PLAINTEXT"):
        check_client_endpoints(["tcp://10.213.0.2:5555"], {})
    check_client_endpoints(["tcp://10.213.0.2:5555"], {"ENGINE_ALLOW_PLAINTEXT": "1"})
    check_client_endpoints(["tcp://10.213.0.2:5555"], {"ENGINE_CURVE_PUBLIC_KEY_FILE": "/k"})


def test_runpod_takes_no_jobs_without_a_ready_engine(tmp_path):
    from vllm_gateway.gateway.api import operations
    from vllm_gateway.gateway.config import RunPodSettings
    from vllm_gateway.gateway.runpod.worker import JobHandler

    async def scenario() -> list[int]:
        handler = JobHandler(RunPodSettings(engine_endpoints=[f"ipc://{tmp_path}/nobody"], max_concurrency=7),
                             operations())
        seen = [handler.ready_for_jobs()]  # no engine has answered yet
        client = handler._ctx.client
        engine = client.engines[0]
        client._on_status(engine, EngineStatus("0", "i1", "ready", "m", 64, protocol_version=PROTOCOL_VERSION))
        seen.append(handler.ready_for_jobs())
        client._on_status(engine, EngineStatus("0", "i1", "loading", "m", 64, protocol_version=PROTOCOL_VERSION))
        seen.append(handler.ready_for_jobs())
        handler._ctx.draining = True
        client._on_status(engine, EngineStatus("0", "i1", "ready", "m", 64, protocol_version=PROTOCOL_VERSION))
        seen.append(handler.ready_for_jobs())
        assert handler.concurrency(1) == 7
        await handler._ctx.close()
        return seen

    assert asyncio.run(scenario()) == [False, True, False, False]


# ----------------------------------------------------- engines beyond this host


NETNS = "vgw-test"


@pytest.fixture()
def remote_engine(run_dir):
    """A synthetic engine on another (simulated) host: a network namespace of the
    test's own, joined to this one by a veth pair (10.213.7.1 here, .2 there)."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "del", "vgw-host"], capture_output=True)
    ip("netns", "add", NETNS)
    ip("link", "add", "vgw-host", "type", "veth", "peer", "name", "vgw-peer")
    ip("link", "set", "vgw-peer", "netns", NETNS)
    ip("addr", "add", "10.213.7.1/30", "dev", "vgw-host")
    ip("link", "set", "vgw-host", "up")
    ip("netns", "exec", NETNS, "ip", "addr", "add", "10.213.7.2/30", "dev", "vgw-peer")
    ip("netns", "exec", NETNS, "ip", "link", "set", "vgw-peer", "up")
    ip("netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
    endpoint = f"tcp://10.213.7.2:{free_port()}"
    engine = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable,
                               str(ROOT / "benchmarks" / "synthetic_engine.py"), "--endpoint", endpoint],
                              env=child_env())
    try:
        yield endpoint
    finally:
        engine.kill()
        engine.wait()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        subprocess.run(["ip", "link", "del", "vgw-host"], capture_output=True)


def test_plaintext_to_an_engine_on_another_host_only_when_allowed(remote_engine, run_dir):
    port = free_port()
    cmd = ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", remote_engine]
    r = subprocess.run([sys.executable, "-m", *cmd], env=child_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "refusing to talk plaintext to " + remote_engine in r.stderr, r.stderr
    gateway = Proc("gateway-plaintext-allowed", cmd, child_env(ENGINE_ALLOW_PLAINTEXT="1"), run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [gateway], 60)
        r = httpx.post(url + "/v1/completions", json={"model": "synthetic", "prompt": "x", "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "01234"
    finally:
        gateway.stop()


def test_a_failed_curve_handshake_is_logged_and_on_health(tmp_path, monkeypatch, caplog):
    from vllm_gateway.protocol.transport import create_keys, secure_server, server_keys

    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()  # authorizes nobody
    _, engine_secret = create_keys(str(keys), "engine")
    _, gw_secret = create_keys(str(keys), "gateway")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("ENGINE_CURVE_PUBLIC_KEY_FILE", str(keys / "engine.key"))
    monkeypatch.setenv("GATEWAY_CURVE_SECRET_KEY_FILE", gw_secret)

    async def scenario() -> str | None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        auth = secure_server(router, server_keys(endpoint, {
            "ENGINE_CURVE_SECRET_KEY_FILE": engine_secret, "ENGINE_CURVE_AUTHORIZED_KEYS": str(authorized)}))
        router.bind(endpoint)
        client = EngineClient([endpoint])
        await client.start()
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                error = client.describe()[0].error
                if error:
                    return error
            return None
        finally:
            await client.close()
            auth.stop()
            router.close(0)
            ctx.term()

    with caplog.at_level("ERROR", logger="gateway.engines"):
        error = asyncio.run(scenario())
    assert error is not None and "CURVE handshake" in error
    assert any("CURVE handshake" in r.getMessage() for r in caplog.records)
