"""Opt-in response cache for deterministic requests (e.g. the same text to speech).

Entries are per token subject (`sid`), keyed by a hash of the canonical request, with
a TTL and a size cap. The cache is an optimisation, never a security decision: a
Redis failure (unreachable, or full: `OOM`) is a miss, logged once per outage.

It lives in a Redis logical space of its own (PROXY_CACHE_REDIS_URL; by default
database 1 of REDIS_URL's server), which can be its own server with `maxmemory` and
`allkeys-lru`: cache entries are evicted, never the limits, nonces and revocations.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from .metrics import CACHE
from .routes import Route

__all__ = ["OPT_IN_HEADER", "CachedAnswer", "ResponseCache"]

log = logging.getLogger(__name__)

OPT_IN_HEADER = "x-keyveil-cache"
_TROUBLE = (redis.exceptions.RedisError, OSError, TimeoutError)

CachedAnswer = tuple[str, bytes]


class ResponseCache:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int, max_entry_bytes: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        # Reads and writes fail apart: a full server still reads (OOM refuses writes).
        self._failing: set[str] = set()

    def _trouble(self, what: str, exc: BaseException) -> None:
        if what not in self._failing:
            self._failing.add(what)
            log.warning("response cache %s failed (%s); serving misses", what, type(exc).__name__)

    def _working(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("response cache %s works again", what)

    @staticmethod
    def key(*, sid: str, route: Route, payload: dict[str, Any]) -> str:
        canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(route.endpoint.encode() + b"\0" + canonical).hexdigest()
        sid_hash = hashlib.sha256(sid.encode()).hexdigest()[:32]
        return f"kv:cache:{sid_hash}:{digest}"

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = await self._redis.get(key)
        except _TROUBLE as exc:
            self._trouble("read", exc)
            CACHE.labels("miss").inc()
            return None
        self._working("read")
        if not isinstance(raw, bytes) or b"\n" not in raw:
            CACHE.labels("miss").inc()
            return None
        CACHE.labels("hit").inc()
        content_type, _, body = raw.partition(b"\n")
        return content_type.decode("latin-1"), body

    async def put(self, key: str, content_type: str, body: bytes) -> None:
        if len(body) > self.max_entry_bytes or "\n" in content_type:
            return
        try:
            await self._redis.set(
                key, content_type.encode("latin-1") + b"\n" + body, ex=self._ttl_s
            )
        except _TROUBLE as exc:
            self._trouble("write", exc)
            CACHE.labels("write_failed").inc()
            return
        self._working("write")
