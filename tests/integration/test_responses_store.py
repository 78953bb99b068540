"""Stored responses that outlive a gateway and follow the client across gateways:
an SQLite file kept across a restart, two gateways sharing one real Redis (read,
chain, cancel, delete and replay on the other), the byte bound under a flood, a
Redis that goes away and comes back. Real `http` gateways in front of the shared
vLLM engine; the Redis is a real `redis-server` started here on a loopback port."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time

import httpx
import openai
import psutil
import pytest

from support import MODEL, Proc, child_env, free_port, wait_healthy, wait_idle
from support.stores import CONTRACT, RedisServer, records_owners_and_deletes
from vllm_gateway.gateway.config import StoreSettings
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.responses.store import ResponseStore

FRANCE = "What is the capital of France?"


def start_gateway(name: str, engine_endpoint, run_dir, **env: str) -> tuple[str, Proc]:
    port = free_port()
    proc = Proc(name, ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", engine_endpoint[0]],
                child_env(**env), run_dir)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [proc], 60)
    return url, proc


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_status(c: openai.OpenAI, rid: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (status := c.responses.retrieve(rid).status) in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def replay(url: str, rid: str, after: int | None = None) -> list[dict]:
    params = {"stream": "true"} | ({"starting_after": str(after)} if after is not None else {})
    events = []
    with httpx.stream("GET", f"{url}/v1/responses/{rid}", params=params, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


@pytest.fixture(scope="module")
def redis_server(run_dir):
    server = RedisServer(run_dir).start()
    yield server
    server.stop()


# ------------------------------------------------------------------ backends


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__)
def test_redis_keeps_the_store_contract(contract, redis_server):
    settings = StoreSettings("redis", redis_server.url, max_bytes=64 * 1024, max_count=10, ttl_s=60)

    def make(s: StoreSettings) -> ResponseStore:
        import redis

        redis.Redis.from_url(s.location).flushdb()  # each contract starts from an empty store
        return ResponseStore(s)

    contract(make, settings)


def test_rediss_with_a_password_and_none_of_it_logged(run_dir, caplog):
    server = RedisServer(run_dir, tls=True, password="s3cret-pw").start()
    try:
        settings = StoreSettings("redis", server.url, max_bytes=64 * 1024, max_count=10, ttl_s=60)
        caplog.set_level("INFO")
        records_owners_and_deletes(ResponseStore, settings)
        assert "stored responses: redis at 127.0.0.1" in caplog.text and "s3cret" not in caplog.text
        plain = dataclasses.replace(settings, location=server.url.replace("rediss://", "redis://").split("?")[0])
        with pytest.raises(APIError) as e:  # the same server without TLS: a 503, the password in no message
            records_owners_and_deletes(ResponseStore, plain)
        assert e.value.status == 503 and "s3cret" not in e.value.message and "s3cret" not in caplog.text
    finally:
        server.stop()


# ----------------------------------------------------------------- a restart


def test_a_restarted_gateway_keeps_its_conversations(engine_endpoint, run_dir, gateway_url):
    store = f"sqlite:///{run_dir}/restart.sqlite3"
    url, proc = start_gateway("gateway-store-1", engine_endpoint, run_dir, RESPONSES_STORE=store)
    first = client(url).responses.create(model=MODEL, input="My name is Ada. Say hello.", max_output_tokens=12,
                                         temperature=0)
    assert proc.stop() == 0
    url, proc = start_gateway("gateway-store-2", engine_endpoint, run_dir, RESPONSES_STORE=store)
    try:
        c = client(url)
        again = c.responses.retrieve(first.id)
        assert again.model_dump() == first.model_dump()  # GET answers as the first answer was given
        follow = c.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                    max_output_tokens=8, temperature=0)
        assert follow.status in ("completed", "incomplete") and follow.previous_response_id == first.id
        # the follow-up carried the whole conversation to the model
        assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    finally:
        proc.stop()


# ------------------------------------------------ two gateways, one Redis


@pytest.fixture(scope="module")
def pair(engine_endpoint, run_dir, gateway_url, redis_server):
    a = start_gateway("gateway-redis-a", engine_endpoint, run_dir, RESPONSES_STORE=redis_server.url)
    b = start_gateway("gateway-redis-b", engine_endpoint, run_dir, RESPONSES_STORE=redis_server.url)
    yield a[0], b[0]
    a[1].stop()
    b[1].stop()


def test_a_response_made_on_one_gateway_is_read_chained_and_deleted_on_another(pair):
    a, b = client(pair[0]), client(pair[1])
    first = a.responses.create(model=MODEL, input="My name is Ada. Say hello.", max_output_tokens=12, temperature=0)
    assert b.responses.retrieve(first.id).model_dump() == first.model_dump()
    follow = b.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=8, temperature=0)
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert a.responses.retrieve(follow.id).output_text == follow.output_text
    b.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(first.id)


def test_a_background_response_is_cancelled_from_the_other_gateway(pair, engine_endpoint):
    a, b = client(pair[0]), client(pair[1])
    long = a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=1500, background=True,
                              extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 60
    while b.responses.retrieve(long.id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.responses.retrieve(long.id).status == "in_progress"
    started = time.monotonic()
    cancelled = b.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and time.monotonic() - started < 5
    assert a.responses.retrieve(long.id).status == "cancelled"
    assert wait_idle(engine_endpoint[0], 10)  # the gateway running it aborted the engine request
    # deleting a running one on the other gateway stops it too
    gone = a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=1500, background=True,
                              extra_body={"ignore_eos": True})
    while a.responses.retrieve(gone.id).status == "queued":
        time.sleep(0.05)
    b.responses.delete(gone.id)
    assert wait_idle(engine_endpoint[0], 10)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(gone.id)


def test_a_lost_stream_resumes_on_the_other_gateway_from_starting_after(pair):
    a = client(pair[0])
    stream = a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=40, temperature=0, background=True,
                                stream=True, extra_body={"ignore_eos": True})
    seen = []
    for event in stream:  # the client reads a few events, then its connection is lost
        seen.append(event)
        if len(seen) == 8:
            break
    stream.close()
    rid = seen[0].response.id
    assert [e.sequence_number for e in seen] == list(range(8)) and seen[0].type == "response.created"
    rest = replay(pair[1], rid, after=seen[-1].sequence_number)
    assert [e["sequence_number"] for e in rest] == list(range(8, 8 + len(rest)))
    assert rest[-1]["type"] == "response.incomplete"  # max_output_tokens reached: the run went on without the client
    text = "".join(e.delta for e in seen if e.type == "response.output_text.delta") + \
        "".join(e["delta"] for e in rest if e["type"] == "response.output_text.delta")
    final = rest[-1]["response"]
    assert text == final["output_text"] and final["usage"]["output_tokens"] == 40
    # the whole stream again, from the start, on either gateway
    full = replay(pair[0], rid)
    assert [e["sequence_number"] for e in full] == list(range(8 + len(rest))) and full[8:] == rest
    assert replay(pair[1], rid, after=8 + len(rest) - 1) == []
    r = httpx.get(f"{pair[0]}/v1/responses/{rid}", params={"stream": "true", "starting_after": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"
    foreground = a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2)
    r = httpx.get(f"{pair[0]}/v1/responses/{foreground.id}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_redis_gone_is_a_503_and_its_return_recovers(pair, redis_server):
    a = client(pair[0])
    kept = a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2)
    redis_server.kill()
    try:
        for call in (lambda: a.responses.retrieve(kept.id),
                     lambda: a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2),
                     lambda: a.responses.create(model=MODEL, input="x", previous_response_id=kept.id,
                                                max_output_tokens=2)):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                call()
            assert e.value.status_code == 503 and e.value.body["code"] == "store_unavailable", e.value.body
            assert time.monotonic() - started < 10
        # what needs no store is served meanwhile
        assert a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2, store=False).status == "incomplete"
    finally:
        redis_server.start()  # the same port, empty (no persistence)
    deadline = time.monotonic() + 20
    while True:
        try:
            again = a.responses.create(model=MODEL, input=FRANCE, max_output_tokens=2)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.2)
    assert a.responses.retrieve(again.id).id == again.id


# ------------------------------------------------------------ the byte bound


def test_a_flood_of_large_stored_bodies_stays_within_the_bound(engine_endpoint, run_dir, gateway_url):
    bound = 512 * 1024
    path = run_dir / "flood.sqlite3"
    url, proc = start_gateway("gateway-store-flood", engine_endpoint, run_dir,
                              RESPONSES_STORE=f"sqlite:///{path}", RESPONSES_STORE_MAX_BYTES=str(bound))
    try:
        c = client(url)
        # too large to store alone: refused before it reaches the engine
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=MODEL, input="word " * 40000, max_output_tokens=1)
        assert e.value.body["param"] == "input" and e.value.body["code"] == "stored_response_too_large", e.value.body
        running = {c.responses.create(model=MODEL, input=FRANCE, max_output_tokens=300, background=True,
                                      extra_body={"ignore_eos": True}).id for _ in range(2)}
        rss = psutil.Process(proc.popen.pid).memory_info().rss
        big = {f"k{i}": (str(i) * 512)[:512] for i in range(16)}  # the most metadata OpenAI allows: 8 KiB echoed back
        made = []
        for i in range(80):
            made.append(c.responses.create(model=MODEL, input=FRANCE, max_output_tokens=1, metadata=big).id)
            for rid in list(running) if i % 4 == 0 else ():  # no running background response disappears
                r = c.responses.retrieve(rid)
                if r.status not in ("queued", "in_progress"):
                    assert r.status == "incomplete" and r.usage.output_tokens == 300, (
                        r.error, proc.tail(), engine_endpoint[1].tail(20))
                    running.discard(rid)  # finished: evictable from now on, like any other
        grown = psutil.Process(proc.popen.pid).memory_info().rss - rss
        with sqlite3.connect(path) as db:
            total, count = db.execute("SELECT bytes, count FROM totals").fetchone()
        assert total <= bound and count < 80
        assert path.stat().st_size < 4 * bound + 1024 * 1024
        assert grown < 64 * 1024 * 1024, grown
        c.responses.retrieve(made[-1])  # the newest are kept, the oldest went
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(made[0])
        for rid in running:
            assert wait_status(c, rid) == "incomplete"
    finally:
        proc.stop()


@pytest.mark.parametrize("spec", ["redis://host:port/x", "mongodb://db"])
def test_a_malformed_store_stops_the_gateway_at_start(run_dir, spec):
    proc = Proc("gateway-bad-store", ["vllm_gateway.gateway", "http", "--port", str(free_port())],
                child_env(RESPONSES_STORE=spec), run_dir)
    assert proc.popen.wait(60) == 2
    proc.stop()
    assert "RESPONSES_STORE" in proc.log_path.read_text() and "redis://[:PASSWORD@]HOST" in proc.log_path.read_text()
