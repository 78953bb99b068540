"""What every response store backend must do (run on SQLite and memory by the
unit tests, on a real Redis by the integration tests), and a real `redis-server`
started on a free loopback port for the tests that need one."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import free_port
from vllm_gateway.gateway.config import StoreSettings
from vllm_gateway.gateway.core.errors import APIError
from vllm_gateway.gateway.responses.schemas import Response
from vllm_gateway.gateway.responses.store import ResponseStore

MakeStore = Callable[[StoreSettings], ResponseStore]


def response(rid: str, status: str = "completed", text: str = "") -> Response:
    return Response(id=rid, created_at=0, model="m", status=status, output_text=text)


def _run(make: MakeStore, settings: StoreSettings, scenario) -> None:
    async def go() -> None:
        store = make(settings)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(go())


def records_owners_and_deletes(make: MakeStore, settings: StoreSettings) -> None:
    async def scenario(store: ResponseStore) -> None:
        conversation = [{"role": "user", "content": "hi"}]
        await store.create(response("a", text="hello"), conversation, "key-a")
        got = await store.get("a", "key-a")
        assert got is not None and got.response.output_text == "hello" and got.record.conversation == conversation
        assert await store.get("a", "key-b") is None and await store.get("a") is None  # another key: not there
        assert not await store.delete("a", "key-b")
        assert await store.update(response("a", text="again"), conversation, "key-a")
        assert (await store.get("a", "key-a")).response.output_text == "again"
        assert await store.delete("a", "key-a") and await store.get("a", "key-a") is None
        assert not await store.update(response("a"), conversation, "key-a")  # gone: an update does not bring it back
        assert await store.usage() == (0, 0)

    _run(make, settings, scenario)


def bounds_never_evict_running(make: MakeStore, settings: StoreSettings) -> None:
    """Count and bytes: the oldest finished go first, running ones never; when
    only running ones are left, a new response is refused (429)."""
    big = "x" * (settings.max_bytes // 8)

    async def scenario(store: ResponseStore) -> None:
        await store.create(response("bg", "in_progress"), [], None)
        for i in range(12):
            await store.create(response(f"r{i}", text=big), [], None)
            total, count = await store.usage()
            assert total <= settings.max_bytes and count <= settings.max_count
        assert await store.get("bg") is not None and await store.get("r11") is not None
        assert await store.get("r0") is None  # the oldest went first
        # only running ones: a new one does not fit, and nothing running went
        pinned = [rid for rid in (f"r{i}" for i in range(12))
                  if await store.update(response(rid, "in_progress", big), [], None)]
        assert len(pinned) >= 4
        with pytest.raises(APIError) as e:
            for i in range(20):
                await store.create(response(f"n{i}", text=big), [], None)
        assert e.value.status == 429 and e.value.code == "store_full"
        assert await store.get("bg") is not None
        assert all([await store.get(rid) is not None for rid in pinned])
        total, count = await store.usage()
        assert total <= settings.max_bytes and count <= settings.max_count
        # a running one growing (its events) stays, over the finished ones
        await store.append("bg", [b"e" * 100] * 3)
        assert [len(e) for e in await store.events("bg", -1)] == [100] * 3

    _run(make, settings, scenario)


def expiry_spares_running(make: MakeStore, settings: StoreSettings) -> None:
    settings = dataclasses.replace(settings, ttl_s=0.3)

    async def scenario(store: ResponseStore) -> None:
        await store.create(response("bg", "in_progress"), [], None)
        await store.create(response("done"), [], None)
        await asyncio.sleep(settings.ttl_s + 0.3)
        assert await store.get("done") is None
        assert await store.get("bg") is not None
        await store.create(response("new"), [], None)  # the expired are swept from the books too
        assert (await store.usage())[1] == 2

    _run(make, settings, scenario)


def events_cancels_and_leases(make: MakeStore, settings: StoreSettings) -> None:
    async def scenario(store: ResponseStore) -> None:
        await store.create(response("bg", "in_progress"), [], None)
        await store.create(response("other", "in_progress"), [], None)
        await store.append("bg", [b'{"n":0}', b'{"n":1}'])
        await store.append("bg", [b'{"n":2}'])
        assert await store.events("bg", -1) == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert await store.events("bg", 1) == [b'{"n":2}'] and await store.events("bg", 2) == []
        lease = (await store.get("bg")).lease
        assert lease > time.time()
        assert await store.heartbeat(["bg", "other"]) == set()
        assert (await store.get("bg")).lease >= lease
        await store.request_cancel("bg")
        assert (await store.get("bg")).cancel
        await store.delete("other")
        assert await store.heartbeat(["bg", "other"]) == {"bg", "other"}  # cancel asked; deleted
        await store.update(response("bg", "cancelled"), [], None)
        got = await store.get("bg")
        assert not got.running and got.response.status == "cancelled"
        assert len(await store.events("bg", -1)) == 3  # still there for a late replay
        await store.create(response("done"), [], None)
        await store.request_cancel("done")  # finished: nothing to cancel
        assert not (await store.get("done")).cancel

    _run(make, settings, scenario)


CONTRACT = (records_owners_and_deletes, bounds_never_evict_running, expiry_spares_running, events_cancels_and_leases)


class RedisServer:
    """A real `redis-server` on a free loopback port, no persistence, stopped
    with the test. `kill()` and `start()` again: a store that goes away. With
    `tls`, it speaks TLS only, with a certificate from a CA made here, and asks
    for `password`."""

    def __init__(self, log_dir: Path, tls: bool = False, password: str | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: deploy/install.sh installs it (as root)")
        self.port = free_port()
        self.log_dir = log_dir
        self.tls = tls
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.ca: Path | None = self._make_certificates() if tls else None

    def _make_certificates(self) -> Path:
        d = self.log_dir / f"redis-tls-{self.port}"
        d.mkdir()

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                "-keyout", "ca.key", "-out", "ca.crt")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
                "-out", "server.csr")
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", "san.ext", "-out", "server.crt")
        return d

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            assert self.ca is not None
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca / 'ca.crt'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        log = open(self.log_dir / f"redis-{self.port}.log", "ab")
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.log_dir)]
        if self.tls:
            assert self.ca is not None
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.ca / "server.crt"),
                     "--tls-key-file", str(self.ca / "server.key"), "--tls-ca-cert-file", str(self.ca / "ca.crt"),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 20 s")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
