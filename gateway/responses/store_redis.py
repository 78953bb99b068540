"""Stored responses in Redis (`RESPONSES_STORE=redis://...`), shared by every
gateway pointed at it, with the `redis` client library.

Keys, under `vllm-gateway:responses:`: `r:<id>` a hash (body, lease, cancel,
events' bytes), `e:<id>` the list of its stream events, `finished` a sorted set
of finished ids by expiry, `sizes` a hash of each response's bytes, `bytes` their
sum. A finished response's keys carry a TTL, so Redis itself drops them when
they expire; running ones carry none. Every change runs as one Lua script, so
the totals and the eviction stay right with any number of gateways at once."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from vllm_gateway.gateway.config import StoreSettings
from vllm_gateway.gateway.responses.backend import Backend, StoreUnavailable

PREFIX = "vllm-gateway:responses:"

# Shared head of the scripts: ARGV[1] is the key prefix; `forget` removes a
# response and its books; `sweep` forgets those whose keys Redis expired.
_COMMON = """
local P = ARGV[1]
local function forget(rid)
  local s = tonumber(redis.call('HGET', P .. 'sizes', rid) or '0')
  redis.call('DECRBY', P .. 'bytes', s)
  redis.call('HDEL', P .. 'sizes', rid)
  redis.call('ZREM', P .. 'finished', rid)
  redis.call('DEL', P .. 'r:' .. rid, P .. 'e:' .. rid)
end
local function sweep(now)
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', now)) do forget(rid) end
end
-- Evict the oldest finished (never `keep`) until `grow` more bytes and `new`
-- more responses fit; whether they do.
local function make_room(grow, new, keep, maxb, maxn)
  while true do
    local total = tonumber(redis.call('GET', P .. 'bytes') or '0')
    if total + grow <= maxb and redis.call('HLEN', P .. 'sizes') + new <= maxn then return true end
    local oldest = redis.call('ZRANGE', P .. 'finished', 0, 1)
    local victim = oldest[1]
    if victim == keep then victim = oldest[2] end
    if not victim then return false end
    forget(victim)
  end
end
"""

# ARGV: prefix, id, body, lease (running: until when; finished: ''), now, ttl, max bytes, max count,
# mode (create/update)
_PUT = _COMMON + """
local id, body, lease, now, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local maxb, maxn, mode = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local key, ev_key = P .. 'r:' .. id, P .. 'e:' .. id
sweep(now)
local exists = redis.call('EXISTS', key) == 1
if mode == 'update' and not exists then return 0 end
local ev = tonumber(redis.call('HGET', key, 'ev') or '0')
local old = tonumber(redis.call('HGET', P .. 'sizes', id) or '0')
local size = #body + ev
local fits = make_room(size - old, exists and 0 or 1, id, maxb, maxn)
if mode == 'create' and not fits then return -1 end
redis.call('HSET', key, 'body', body, 'ev', ev)
redis.call('HSET', P .. 'sizes', id, size)
redis.call('INCRBY', P .. 'bytes', size - old)
if lease ~= '' then
  redis.call('HSET', key, 'lease', lease)
  redis.call('ZREM', P .. 'finished', id)
  redis.call('PERSIST', key)
  redis.call('PERSIST', ev_key)
else
  redis.call('HDEL', key, 'lease', 'cancel')
  local ms = math.floor(ttl * 1000)
  redis.call('PEXPIRE', key, ms)
  redis.call('PEXPIRE', ev_key, ms)
  redis.call('ZADD', P .. 'finished', now + ttl, id)
end
return 1
"""

# ARGV: prefix, id, now, max bytes, max count, events...
_APPEND = _COMMON + """
local id, now, maxb, maxn = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local key = P .. 'r:' .. id
if redis.call('EXISTS', key) == 0 then return 0 end
local n = 0
for i = 6, #ARGV do n = n + #ARGV[i] end
sweep(now)
make_room(n, 0, id, maxb, maxn)
for i = 6, #ARGV do redis.call('RPUSH', P .. 'e:' .. id, ARGV[i]) end
redis.call('HINCRBY', key, 'ev', n)
redis.call('HINCRBY', P .. 'sizes', id, n)
redis.call('INCRBY', P .. 'bytes', n)
return 1
"""

# ARGV: prefix, id
_DELETE = _COMMON + """
local existed = redis.call('EXISTS', P .. 'r:' .. ARGV[2])
forget(ARGV[2])
return existed
"""

# ARGV: prefix, lease until, ids... -> the ids to stop (cancel asked, or gone)
_HEARTBEAT = _COMMON + """
local stop = {}
for i = 3, #ARGV do
  local key = P .. 'r:' .. ARGV[i]
  if redis.call('EXISTS', key) == 0 or redis.call('HGET', key, 'cancel') == '1' then
    table.insert(stop, ARGV[i])
  else
    redis.call('HSET', key, 'lease', ARGV[2])
  end
end
return stop
"""


class RedisBackend(Backend):
    def __init__(self, limits: StoreSettings) -> None:
        super().__init__(limits)
        # Short timeouts and one quick retry: with Redis gone, a request gets its
        # 503 in about a second instead of hanging; the client reconnects by itself.
        self.redis = aioredis.Redis.from_url(
            limits.location, socket_timeout=2, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1), health_check_interval=30)
        self._put = self.redis.register_script(_PUT)
        self._append = self.redis.register_script(_APPEND)
        self._delete = self.redis.register_script(_DELETE)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)

    async def _do(self, awaitable):
        try:
            return await awaitable
        except RedisError as e:
            raise StoreUnavailable(f"Redis: {type(e).__name__}: {e}") from None
        except (OSError, TypeError, ValueError) as e:  # also a connection option Redis's client refuses
            raise StoreUnavailable(f"Redis: {e}") from None

    def _limits(self) -> list:
        return [self.limits.max_bytes, self.limits.max_count]

    async def _put_as(self, mode: str, rid: str, body: bytes, lease: float | None) -> int:
        return await self._do(self._put(args=[PREFIX, rid, body, "" if lease is None else repr(lease), time.time(),
                                              self.limits.ttl_s, *self._limits(), mode]))

    async def create(self, rid: str, body: bytes, lease: float | None) -> bool:
        return await self._put_as("create", rid, body, lease) == 1

    async def update(self, rid: str, body: bytes, lease: float | None) -> bool:
        return await self._put_as("update", rid, body, lease) == 1

    async def get(self, rid: str) -> tuple[bytes, float, bool] | None:
        body, lease, cancel = await self._do(self.redis.hmget(PREFIX + "r:" + rid, "body", "lease", "cancel"))
        if body is None:
            return None
        return body, float(lease or 0), cancel == b"1"

    async def delete(self, rid: str) -> bool:
        return bool(await self._do(self._delete(args=[PREFIX, rid])))

    async def append(self, rid: str, events: list[bytes]) -> None:
        if events:
            await self._do(self._append(args=[PREFIX, rid, time.time(), *self._limits(), *events]))

    async def events(self, rid: str, after: int) -> list[bytes]:
        return await self._do(self.redis.lrange(PREFIX + "e:" + rid, max(after + 1, 0), -1))

    async def request_cancel(self, rid: str) -> None:
        key = PREFIX + "r:" + rid
        # Only a live, running response (a finished one has a TTL, a running one none).
        async with self.redis.pipeline(transaction=True) as p:
            p.exists(key)
            p.pttl(key)
            exists, ttl = await self._do(p.execute())
        if exists and ttl == -1:
            await self._do(self.redis.hset(key, "cancel", "1"))

    async def heartbeat(self, rids: list[str], lease_until: float) -> set[str]:
        if not rids:
            return set()
        stop = await self._do(self._heartbeat(args=[PREFIX, lease_until, *rids]))
        return {s.decode() if isinstance(s, bytes) else s for s in stop}

    async def usage(self) -> tuple[int, int]:
        async with self.redis.pipeline(transaction=True) as p:
            p.get(PREFIX + "bytes")
            p.hlen(PREFIX + "sizes")
            total, count = await self._do(p.execute())
        return int(total or 0), int(count)

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except (RedisError, OSError):
            pass

