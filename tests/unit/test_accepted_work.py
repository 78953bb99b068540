"""A replica that sheds honestly and loses nothing, in process: stored responses
(eviction, ownership, background failures, a stopping gateway), settings that
fail closed, RunPod taking jobs only with a ready engine, CURVE handshake
failures on /health. The request cap, slow clients and a held-up loop:
integration/test_gateway_alone.py (synthetic engine) and test_reliability.py (vLLM)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from support import ROOT, child_env, free_port, stores
from vllm_gateway.gateway.config import GatewaySettings, StoreSettings
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.engines.client import EngineClient, Unencodable
from vllm_gateway.gateway.responses import serving
from vllm_gateway.gateway.responses.store import ResponseStore
from vllm_gateway.protocol.messages import PROTOCOL_VERSION, EngineStatus
from vllm_gateway.protocol.transport import InsecureEndpoint, check_client_endpoints


# ------------------------------------------------------------- stored responses

SMALL = StoreSettings("memory", "", max_bytes=64 * 1024, max_count=10, ttl_s=60)


@pytest.fixture(params=["memory", "sqlite"])
def store_settings(request, tmp_path) -> StoreSettings:
    return dataclasses.replace(SMALL, kind=request.param, location=str(tmp_path / "responses.sqlite3"))


@pytest.mark.parametrize("contract", stores.CONTRACT, ids=lambda f: f.__name__)
def test_store_backends_keep_the_contract(contract, store_settings):
    contract(ResponseStore, store_settings)


def test_an_sqlite_store_survives_a_restart(tmp_path):
    settings = dataclasses.replace(SMALL, kind="sqlite", location=str(tmp_path / "sub" / "r.sqlite3"))

    async def scenario() -> None:
        first = ResponseStore(settings)
        await first.create(stores.response("kept", text="hello"), [{"role": "user", "content": "hi"}], "key")
        await first.close()
        second = ResponseStore(settings)
        got = await second.get("kept", "key")
        assert got is not None and got.response.output_text == "hello"
        assert await second.usage() == (len(msgspec.json.encode(got.record)), 1)
        await second.close()

    asyncio.run(scenario())


def test_an_unusable_sqlite_file_is_a_503_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    settings = dataclasses.replace(SMALL, kind="sqlite", location=str(tmp_path / "file" / "r.sqlite3"))

    async def scenario() -> None:
        store = ResponseStore(settings)
        with pytest.raises(APIError) as e:
            await store.get("x")
        assert e.value.status == 503 and e.value.code == "store_unavailable" and "r.sqlite3" in e.value.message
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("spec", ["postgres://db/x", "redis://", "redis://host:70000", "redis://host/zero",
                                  "sqlite:///", "memroy", "redis://host/0?ssl_ca_certs=/ca.crt",
                                  "redis://host/0?socket_timeout=soon"])
def test_a_malformed_store_stops_the_start(spec):
    with pytest.raises(ValueError, match="RESPONSES_STORE"):
        GatewaySettings.from_env({"RESPONSES_STORE": spec})


class _Refusing:
    """An engine client whose submit finds a value the wire cannot carry."""

    def submit(self, gens, exact=False):
        raise Unencodable("int too big to convert")


async def _background(rs: serving.Responses, client) -> str:
    from vllm_gateway.gateway.responses.schemas import ResponsesRequest

    req = msgspec.convert({"input": "hi", "background": True, "store": True}, ResponsesRequest)
    prepared = await serving.prepare(req, "m", rs)
    queued = await serving.start_background(rs, client, prepared, 0)
    assert queued.status == "queued"
    return queued.id


def test_a_background_response_whose_submission_fails_ends_failed_and_can_be_cancelled():
    async def scenario() -> None:
        rs = serving.Responses.of(ResponseStore(SMALL))
        rid = await _background(rs, _Refusing())
        for _ in range(50):
            await asyncio.sleep(0.01)
            if (await serving.fetch(rs, rid)).status != "queued":
                break
        failed = await serving.fetch(rs, rid)
        assert failed.status == "failed" and failed.error is not None and "value out of range" in failed.error.message
        again = await serving.cancel(rs, rid)  # no error re-raised
        assert again.status == "failed"
        # its replay ends with the failure
        events = [e async for batch in (await serving.replay(rs, rid, None, -1)).batches for e in batch]
        assert [type(e).__name__ for e in events] == ["Failed"]
        await rs.close("done")

    asyncio.run(scenario())


class _Stuck:
    def submit(self, gens, exact=False):
        return _Never()

    def release(self, stream, *, abort):
        pass


def test_a_stopping_gateway_fails_running_background_responses():
    async def scenario() -> None:
        rs = serving.Responses.of(ResponseStore(SMALL))
        rid = await _background(rs, _Stuck())
        await asyncio.sleep(0.05)
        assert (await serving.fetch(rs, rid)).status == "queued"  # the engine took nothing yet
        assert await rs.runner.fail_running("the gateway stopped") == 1
        stopped = await serving.fetch(rs, rid)
        assert stopped.status == "failed" and stopped.error.message == "the gateway stopped"
        await rs.store.close()

    asyncio.run(scenario())


def test_a_response_whose_gateway_died_reads_as_failed(tmp_path):
    """Two gateways on one SQLite file: the one running a response dies (its
    lease lapses); the other ends it failed when it reads it."""
    settings = dataclasses.replace(SMALL, kind="sqlite", location=str(tmp_path / "r.sqlite3"))

    async def scenario() -> None:
        dead = ResponseStore(settings)
        await dead.create(stores.response("orphan", "in_progress"), [], None)
        await dead.backend.update("orphan", (await dead.backend.get("orphan"))[0], time.time() - 1)  # lapsed
        alive = serving.Responses.of(ResponseStore(settings))
        got = await serving.fetch(alive, "orphan")
        assert got.status == "failed" and "stopped before it finished" in got.error.message
        await dead.close()
        await alive.close("done")

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
