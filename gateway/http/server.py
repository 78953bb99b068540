"""The HTTP server process: uvicorn (uvloop + httptools) with a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from vllm_gateway.gateway.config import GatewaySettings
from vllm_gateway.gateway.core.operations import Context, Operations
from vllm_gateway.gateway.http.app import build_app

log = logging.getLogger("gateway.http")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM / SIGINT drains: new requests get a
    503 (and /health too, so balancers move on), running ones may finish for up to
    `drain_timeout_s`, then the server stops and the process exits 0. A second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, ctx: Context, grace_s: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.ctx.draining or self._loop is None:
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.ctx.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        client = self.ctx.client
        log.info("draining: %d request(s) in flight, up to %.0f s", client.in_flight, self.grace_s)
        deadline = time.monotonic() + self.grace_s
        while client.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if client.in_flight:
            log.warning("drain time over; %d request(s) still running are cut off", client.in_flight)
        else:
            log.info("drained")
        self.should_exit = True


def serve(settings: GatewaySettings, operations: Operations) -> None:
    app = build_app(settings, operations)
    log.info("HTTP gateway on http://%s:%d, engines %s", settings.host, settings.port, ", ".join(settings.engine_endpoints))

    def config(port: int) -> uvicorn.Config:
        return uvicorn.Config(app, host=settings.host, port=port, loop="uvloop", http="httptools",
                              log_level="warning", access_log=False, timeout_graceful_shutdown=5)

    main = config(settings.port)
    sockets = [main.bind_socket()]
    if settings.health_port and settings.health_port != settings.port:
        # RunPod's load balancer pings PORT_HEALTH: the same server answers there.
        sockets.append(config(settings.health_port).bind_socket())
        log.info("health (and the API) also on port %d (PORT_HEALTH)", settings.health_port)
    DrainingServer(main, app.state.ctx, settings.drain_timeout_s).run(sockets=sockets)
