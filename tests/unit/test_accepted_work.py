"""A replica that sheds honestly and loses nothing, in process: stored responses
(eviction, ownership, background failures, a stopping gateway), settings that
fail closed, RunPod taking jobs only with a ready engine, CURVE handshake
failures on /health. The request cap, slow clients and a held-up loop:
integration/test_gateway_alone.py (synthetic engine) and test_reliability.py (vLLM)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import msgspec
import pytest
import zmq
import zmq.asyncio

from support import ROOT, child_env, free_port
from vllm_gateway.gateway.config import GatewaySettings
from vllm_gateway.gateway.engines.client import EngineClient, Unencodable
from vllm_gateway.gateway.responses import serving
from vllm_gateway.gateway.responses.schemas import Response
from vllm_gateway.gateway.responses.store import ResponseStore
from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus
from vllm_gateway.protocol.transport import InsecureEndpoint, check_client_endpoints


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
