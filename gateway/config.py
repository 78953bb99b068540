"""Gateway settings, from the environment (flags of `vllm-gateway http` override)."""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping

from vllm_gateway.gateway.engines.routing import POLICIES, Balance, Router
from vllm_gateway.protocol.endpoints import parse_endpoints
from vllm_gateway.protocol.transport import check_client_endpoints


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False, "": False}


def parse_bool(value: str) -> bool:
    """worker-vllm's spelling of booleans (the engine's settings read them alike)."""
    try:
        return _BOOLS[value.strip().lower()]
    except KeyError:
        raise ValueError(f"not a boolean: {value!r} (use 0 or 1)") from None


def _env(env: Mapping[str, str], name: str, default, parse=str):
    """`name` from `env`, parsed; unset or empty: `default`. A bad value raises
    ValueError naming the variable."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    """Where stored Responses API answers live (RESPONSES_STORE) and their bounds.

    `kind` is `sqlite` (a file, the default: conversations survive a restart),
    `memory` (this process only) or `redis` (shared by every gateway pointed at it)."""

    kind: str = "sqlite"
    location: str = ""  # the SQLite file, or the Redis URL (it may hold a password: never logged)
    max_bytes: int = 1 << 30  # RESPONSES_STORE_MAX_BYTES
    max_count: int = 100_000  # RESPONSES_STORE_SIZE
    ttl_s: float = 30 * 24 * 3600  # RESPONSES_STORE_TTL_S: OpenAI keeps them 30 days

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "StoreSettings":
        kind, location = parse_store(env.get("RESPONSES_STORE", ""), env)
        s = cls(kind, location, _env(env, "RESPONSES_STORE_MAX_BYTES", cls.max_bytes, _byte_size),
                _env(env, "RESPONSES_STORE_SIZE", cls.max_count, int),
                _env(env, "RESPONSES_STORE_TTL_S", cls.ttl_s, float))
        if s.max_bytes < 4096 or s.max_count < 1 or s.ttl_s <= 0:
            raise ValueError("RESPONSES_STORE_MAX_BYTES must be at least 4096, RESPONSES_STORE_SIZE at least 1 "
                             "and RESPONSES_STORE_TTL_S above 0")
        return s

    @property
    def max_item_bytes(self) -> int:
        """The most one stored response (its conversation, output and events) may
        take: a quarter of the store, so one conversation never crowds out the rest."""
        return self.max_bytes // 4

    def describe(self) -> str:
        """For the log: where, without any password."""
        if self.kind == "redis":
            u = urllib.parse.urlsplit(self.location)
            return f"redis at {u.hostname}:{u.port or 6379}{u.path or '/0'}"
        return "this process's memory" if self.kind == "memory" else f"SQLite file {self.location}"


def _byte_size(raw: str) -> int:
    """A byte count: 1048576, 512MiB, 1GiB, 64MB."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B?)?\s*", raw, re.IGNORECASE)
    if m is None:
        raise ValueError("a byte count such as 1073741824, 512MiB or 1GiB")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(m.group(1)) * scale


def default_store_path(env: Mapping[str, str]) -> str:
    """The SQLite file when RESPONSES_STORE is unset: under BASE_PATH (a RunPod
    network volume, a mounted disk) if set, else the user's cache folder."""
    base = env.get("BASE_PATH")
    if base:
        return os.path.join(base, "vllm-gateway", "responses.sqlite3")
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vllm-gateway", "responses.sqlite3")


def parse_store(raw: str, env: Mapping[str, str]) -> tuple[str, str]:
    """RESPONSES_STORE as (kind, location); a malformed value raises ValueError
    saying what is accepted (it stops the start-up)."""
    spec = raw.strip()
    accepted = ("RESPONSES_STORE must be empty (an SQLite file under BASE_PATH), memory, sqlite:///PATH "
                "or redis://[:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS)")
    if not spec or spec.lower() == "sqlite":
        return "sqlite", default_store_path(env)
    if spec.lower() == "memory":
        return "memory", ""
    scheme = spec.split(":", 1)[0].lower()
    if scheme == "sqlite":
        path = spec[len("sqlite:"):]
        path = path[2:] if path.startswith("//") else path  # sqlite:///abs/file -> /abs/file
        if not path or path.endswith("/"):
            raise ValueError(f"RESPONSES_STORE: {spec!r} names no file. " + accepted)
        return "sqlite", path
    if scheme in ("redis", "rediss"):
        try:
            u = urllib.parse.urlsplit(spec)
            port = u.port  # raises ValueError on a port that is not a number
        except ValueError as e:
            raise ValueError(f"RESPONSES_STORE: not a Redis URL ({e}). " + accepted) from None
        db = u.path.lstrip("/")
        if not u.hostname or (db and not db.isdigit()) or (port is not None and not 0 < port < 65536):
            raise ValueError("RESPONSES_STORE: a Redis URL needs a host, and its path (if any) a database "
                             "number. " + accepted)
        options = urllib.parse.parse_qs(u.query)
        if scheme == "redis" and any(k.startswith("ssl") for k in options):
            raise ValueError("RESPONSES_STORE: ssl_* options need a rediss:// URL (TLS)")
        from redis.asyncio.connection import parse_url  # only when Redis is asked for

        try:
            parse_url(spec)
        except ValueError as e:  # its options, checked now rather than at the first request
            raise ValueError(f"RESPONSES_STORE: {e}") from None
        return "redis", spec
    raise ValueError("RESPONSES_STORE: unknown store. " + accepted)


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """How a request picks its engine (gateway/engines/routing.py)."""

    policy: str = "prefix"  # ROUTING: prefix | least_loaded
    balance_abs: float = 8.0  # ROUTING_BALANCE_ABS: requests more than the least loaded ...
    balance_rel: float = 1.5  # ROUTING_BALANCE_REL: ... and this many times as many: spill over

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "RoutingSettings":
        policy = env.get("ROUTING", cls.policy).strip().lower().replace("-", "_")
        if policy not in POLICIES:
            raise ValueError(f"ROUTING={env.get('ROUTING')!r}: one of {', '.join(POLICIES)}")
        s = cls(policy, _env(env, "ROUTING_BALANCE_ABS", cls.balance_abs, float),
                _env(env, "ROUTING_BALANCE_REL", cls.balance_rel, float))
        if s.balance_abs < 0 or s.balance_rel < 1:
            raise ValueError("ROUTING_BALANCE_ABS must be >= 0 and ROUTING_BALANCE_REL >= 1")
        return s

    def router(self) -> Router:
        return Router(self.policy, Balance(self.balance_abs, self.balance_rel))  # type: ignore[arg-type]


# MAX_CONCURRENT_REQUESTS' default per engine behind a gateway: twice vLLM's default
# max_num_seqs (256), so that every engine can be full with as many waiting, and
# no more queue than that builds up in front of it.
PER_ENGINE_CONCURRENCY = 512


@dataclasses.dataclass
class ServingSettings:
    """What every intake serves with: the engines, timeouts, chat's role, stored
    responses, routing. Read from the environment in one place (`_read`); the
    HTTP gateway's and the RunPod worker's settings add their own."""

    engine_endpoints: list[str] = dataclasses.field(default_factory=lambda: parse_endpoints(None))
    engine_timeout_s: float = 5  # an engine silent this long fails its requests
    engine_start_timeout_s: float = 3600  # engines not ready by then is an error
    request_timeout_s: float = 0  # 0: no limit
    drain_timeout_s: float = 30  # on SIGTERM, running requests may finish for this long
    response_role: str = "assistant"
    # Stored Responses API answers (previous_response_id, GET, background).
    responses_store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's switch for them).
    allow_runtime_lora: bool = False
    routing: RoutingSettings = dataclasses.field(default_factory=RoutingSettings)

    @classmethod
    def _read(cls, env: Mapping[str, str]) -> dict:
        endpoints = parse_endpoints(env.get("ENGINE_ENDPOINTS"))
        check_client_endpoints(endpoints, env)
        return dict(
            engine_endpoints=endpoints,
            engine_timeout_s=_env(env, "ENGINE_TIMEOUT_S", cls.engine_timeout_s, float),
            engine_start_timeout_s=_env(env, "ENGINE_START_TIMEOUT_S", cls.engine_start_timeout_s, float),
            request_timeout_s=_env(env, "REQUEST_TIMEOUT_S", cls.request_timeout_s, float),
            drain_timeout_s=_env(env, "DRAIN_TIMEOUT_S", cls.drain_timeout_s, float),
            response_role=_env(env, "OPENAI_RESPONSE_ROLE", cls.response_role),
            responses_store=StoreSettings.from_env(env),
            allow_runtime_lora=_env(env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING", cls.allow_runtime_lora, parse_bool),
            routing=RoutingSettings.from_env(env),
        )


@dataclasses.dataclass
class GatewaySettings(ServingSettings):
    """The HTTP gateway's settings (flags of `vllm-gateway http` override)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # A second port answering the same (RunPod load-balancing endpoints ping
    # PORT_HEALTH); 0 or `port`: none.
    health_port: int = 0
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout_s: float = 30  # a request body must arrive within this
    # Stream batching: 0 writes each engine step as it comes; N > 0 at most one
    # write per stream every N ms (fewer, larger SSE events: less CPU per token).
    stream_interval_ms: float = 0
    # Requests reaching an engine in flight at once; beyond it a 429 at once. 0: no cap.
    # Default: PER_ENGINE_CONCURRENCY per engine behind this gateway.
    max_concurrent_requests: int = 512
    # A stream whose client reads nothing for this long, or lets this many engine
    # outputs pile up unsent, is ended (its engine request aborted). 0: no limit.
    stream_write_timeout_s: float = 30
    stream_max_unsent: int = 2048
    # API keys (none: no key needed) and the paths open without one (probes and
    # scrapers carry no key).
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # never printed
    open_paths: tuple[str, ...] = ("/health", "/ping", "/metrics")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "GatewaySettings":
        return cls(
            **cls._read(env),
            host=_env(env, "HOST", cls.host),
            port=_env(env, "PORT", cls.port, int),
            health_port=_env(env, "PORT_HEALTH", cls.health_port, int),
            max_body_bytes=_env(env, "MAX_REQUEST_BODY_BYTES", cls.max_body_bytes, int),
            body_timeout_s=_env(env, "REQUEST_BODY_TIMEOUT_S", cls.body_timeout_s, float),
            stream_interval_ms=_env(env, "STREAM_INTERVAL_MS", cls.stream_interval_ms, float),
            max_concurrent_requests=_env(
                env, "MAX_CONCURRENT_REQUESTS",
                PER_ENGINE_CONCURRENCY * len(parse_endpoints(env.get("ENGINE_ENDPOINTS"))), int),
            stream_write_timeout_s=_env(env, "STREAM_WRITE_TIMEOUT_S", cls.stream_write_timeout_s, float),
            stream_max_unsent=_env(env, "STREAM_MAX_UNSENT", cls.stream_max_unsent, int),
            api_keys=api_keys(env),
            open_paths=tuple(p.strip() for p in env.get("API_KEY_OPEN_PATHS", ",".join(cls.open_paths)).split(",")
                             if p.strip()),
        )


def api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """Keys comma-separated in API_KEY and VLLM_API_KEY (vllm serve's name), and
    one per line in API_KEY_FILE (blank lines and `#` comments skipped). Keys fail
    closed: a variable that is set but names no key (API_KEY=",", an empty key
    file) is an error, never a server open to all."""
    keys: list[str] = []
    for name in ("API_KEY", "VLLM_API_KEY"):
        raw = env.get(name, "")
        found = [k.strip() for k in raw.split(",") if k.strip()]
        if raw.strip() and not found:
            raise ValueError(f"{name} is set but holds no key (refusing to serve every route without one)")
        keys += found
    path = env.get("API_KEY_FILE")
    if path:
        try:
            with open(path) as f:
                found = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise ValueError(f"API_KEY_FILE={path!r}: {e.strerror}") from None
        if not found:
            raise ValueError(f"API_KEY_FILE={path!r} holds no key (refusing to serve every route without one)")
        keys += found
    return tuple(dict.fromkeys(keys))


@dataclasses.dataclass
class RunPodSettings(ServingSettings):
    """The RunPod worker's settings (names and defaults of RunPod's worker-vllm)."""

    own_engines: bool = True  # no ENGINE_ENDPOINTS: the worker starts its engines
    max_concurrency: int = 300
    # OpenAI streaming: whole SSE event strings (1) or lists of chunk objects (0).
    raw_openai_output: bool = True
    max_batch_size: int = 50
    min_batch_size: int = 1
    batch_size_growth_factor: float = 3.0
    # How long a job waits for an engine to be ready before failing with a 503.
    engine_wait_s: float = 300.0
    metrics_port: int = 0  # 0: no /metrics listener
    metrics_host: str = "127.0.0.1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RunPodSettings":
        def get(name: str, default, parse=str):
            return _env(env, name, default, parse)

        s = cls(
            **cls._read(env),
            own_engines=not env.get("ENGINE_ENDPOINTS"),
            max_concurrency=get("MAX_CONCURRENCY", cls.max_concurrency, int),
            raw_openai_output=get("RAW_OPENAI_OUTPUT", cls.raw_openai_output, parse_bool),
            max_batch_size=get("DEFAULT_BATCH_SIZE", cls.max_batch_size, int),
            min_batch_size=get("DEFAULT_MIN_BATCH_SIZE", cls.min_batch_size, int),
            batch_size_growth_factor=get("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", cls.batch_size_growth_factor, float),
            engine_wait_s=get("ENGINE_WAIT_S", cls.engine_wait_s, float),
            metrics_port=get("METRICS_PORT", cls.metrics_port, int),
            metrics_host=get("METRICS_HOST", cls.metrics_host),
        )
        if s.max_concurrency < 1 or s.max_batch_size < 1 or s.min_batch_size < 1 or s.batch_size_growth_factor < 1:
            raise ValueError("MAX_CONCURRENCY, DEFAULT_BATCH_SIZE and DEFAULT_MIN_BATCH_SIZE must be >= 1, "
                             "DEFAULT_BATCH_SIZE_GROWTH_FACTOR >= 1")
        return s
