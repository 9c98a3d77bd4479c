"""Quota state shared by the server processes of one deployment, in Redis (with --redis-url).

Several gateways serve one deployment, so a tenant's limits must hold over all of them, not per
process. Kept here, each change one atomic Lua script (check and take in one step, so concurrent
requests on different processes cannot together pass a limit), on Redis's clock:

* **requests/s**: a sorted set of the tenant's submissions over the last window.
* **live models**: a set of the tenant's live model ids (added when an adapter is made or loaded,
  removed when it is unloaded or its session ends, by whichever process does it).
* **sampling admission**: leases on places in the sample queue of the whole deployment, and in
  each tenant's share of it, each with an expiry, so the places of a process that died come back
  by themselves.

tokens/s and in-flight requests stay per process (server/tenancy/quotas.py): the first is charged
by the scheduler as calls start, the second counts the process's own queue.

Redis is on the submission path: when it cannot be reached, a submission fails at once with a 503
(Unavailable) that the SDK retries, and succeeds again as soon as Redis is back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.errors import Busy, Unavailable

log = logging.getLogger(__name__)
# Fail fast: a submission waits at most this long for a Redis that is down.
TIMEOUTS = {"socket_connect_timeout": 0.5, "socket_timeout": 2.0}
SAMPLE_LEASE_MS = 15 * 60 * 1000  # a sample queued longer than this has its place back anyway

_NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS[1] window; ARGV window_ms, budget, member. -> 0, or the ms until there is room.
_ADMIT = _NOW + """
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used > 0 and used + 1 > tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(tonumber(oldest[2]) + window - now, 1)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""

# KEYS[1] set; ARGV limit, member. -> -1 if taken (or held already), else the count that is full.
_CLAIM = """
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then return -1 end
local n = redis.call('SCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return n end
redis.call('SADD', KEYS[1], ARGV[2])
return -1
"""

# KEYS[1] all leases, KEYS[2] the tenant's; ARGV limit, tenant_limit, member, lease_ms.
# -> 0 if a place was taken, 1 if the queue is full, 2 if the tenant's share is.
_LEASE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 2 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return 0
"""


class SharedQuotas:
    def __init__(self, url: str, prefix: str) -> None:
        self._redis = aioredis.from_url(url, **TIMEOUTS)
        self._prefix = f"{prefix}:quota"
        self._admit = self._redis.register_script(_ADMIT)
        self._claim = self._redis.register_script(_CLAIM)
        self._lease = self._redis.register_script(_LEASE)

    async def _do(self, what: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", extra={"during": what, "error": type(exc).__name__})
            raise Unavailable("the deployment's shared state (Redis) cannot be reached right now; try again "
                              "shortly", retry_after=1.0) from None

    async def admit_request(self, tenant: str, per_second: float, window_s: float) -> None:
        """Count one submission against the tenant's requests/s, or refuse it with a 429."""
        window_ms = int(window_s * 1000)
        key = f"{self._prefix}:requests:{tenant}"
        wait_ms = await self._do("admit", self._admit(keys=[key], args=[window_ms, per_second * window_s,
                                                                         uuid.uuid4().hex]))
        if wait_ms:
            log.info("submission_refused", extra={"tenant_id": tenant, "limit": "requests_per_second"})
            raise Busy(f"rate limit: this tenant may submit {per_second:g} requests/s (over {window_s:g} s, on "
                       f"all servers); retry in {wait_ms / 1000:.1f} s", retry_after=wait_ms / 1000)

    def _live(self, tenant: str) -> str:
        return f"{self._prefix}:live-models:{tenant}"

    async def live_models(self, tenant: str) -> int:
        return await self._do("live_models", self._redis.scard(self._live(tenant)))

    async def check_model_room(self, tenant: str, limit: int) -> None:
        if (count := await self.live_models(tenant)) >= limit:
            raise _models_full(tenant, count, limit)

    async def claim_model(self, tenant: str, model_id: str, limit: int) -> None:
        """Count the model as live, or refuse it (Busy) when the tenant has `limit` already."""
        full = await self._do("claim_model", self._claim(keys=[self._live(tenant)], args=[limit, model_id]))
        if full >= 0:
            raise _models_full(tenant, full, limit)

    async def release_model(self, tenant: str, model_id: str) -> None:
        await self._do("release_model", self._redis.srem(self._live(tenant), model_id))

    def _samples(self, tenant: str) -> str:
        return f"{self._prefix}:samples:{tenant}"

    async def take_sample_place(self, tenant: str, limit: int, tenant_limit: int) -> tuple[str | None, str]:
        """A place in the deployment's sample queue: (its token, to give back, ""), or (None, which
        limit is full: "queue" or "tenant")."""
        token = uuid.uuid4().hex
        full = await self._do("take_sample_place", self._lease(
            keys=[f"{self._prefix}:samples", self._samples(tenant)], args=[limit, tenant_limit, token, SAMPLE_LEASE_MS]))
        return (token, "") if full == 0 else (None, "queue" if full == 1 else "tenant")

    async def release_sample_place(self, tenant: str, token: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(f"{self._prefix}:samples", token).zrem(self._samples(tenant), token)
        await self._do("release_sample_place", pipe.execute())

    async def close(self) -> None:
        await self._redis.aclose()


def _models_full(tenant: str, count: int, limit: int) -> Busy:
    log.info("submission_refused", extra={"tenant_id": tenant, "limit": "max_live_models"})
    return Busy(f"quota: this tenant already has {count} live models (limit {limit}); unload one (or let its "
                "session end) first", retryable=False)
