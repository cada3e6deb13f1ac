"""The voice session registry in Redis, shared by every proxy replica and the CLI.

Keys (all under `kv:voice:`):

    kv:voice:live                 set of session ids not yet closed
    kv:voice:session:<id>         hash: the record (`VoiceSession` fields, JSON values)
    kv:voice:owner:<id>           the replica holding the sideband; a lease with a TTL
    kv:voice:close:<id>           a close request (the reason), from `keyveil sessions close`

A replica renews the owner lease of each sideband it holds; when a replica dies its
leases expire and another replica claims the session (`SET NX PX`, atomic) and
re-attaches. Renewal and release compare the owner first (Lua), so a replica that
lost its lease can never extend or delete another's.

The usage outbox (`pending_*`, `billed_s`) makes billing exactly-once downstream: a
usage event is written to the record before it is published (with its final event
id), and the watermark moves only after JetStream acknowledged it; a replica that
takes over republishes a pending event under the same id (JetStream deduplicates).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from shared.tokens import revoked_key

__all__ = [
    "LIVE_SET",
    "VoiceRegistry",
    "VoiceSession",
    "close_key",
    "owner_key",
    "session_key",
]

LIVE_SET: Final = "kv:voice:live"
_RECORD_TTL_S: Final = 7 * 86_400

_RENEW_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def session_key(session_id: str) -> str:
    return f"kv:voice:session:{session_id}"


def owner_key(session_id: str) -> str:
    return f"kv:voice:owner:{session_id}"


def close_key(session_id: str) -> str:
    return f"kv:voice:close:{session_id}"


class VoiceSession(BaseModel):
    """One brokered session, as every replica and the CLI see it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    api: str  # shared.voicepolicy.VoiceApi value
    token_id: str
    token_session: str  # the proxy token's `sid`
    user: str | None = None  # the token's principal hash and app (budgets)
    app: str | None = None
    model: str
    voice: str | None = None
    started_at: float = Field(default_factory=time.time)
    ends_at: float  # started_at + the policy's max session length
    pinned: dict[str, Any] = Field(default_factory=dict)  # the session sent upstream
    status: str = "live"  # live | closing | closed
    closed_reason: str | None = None
    closed_at: float | None = None
    billed_s: float = 0.0  # cumulative billable seconds acknowledged on JetStream
    tokens: int = 0  # Realtime: total tokens acknowledged on JetStream
    pending_event: str | None = None  # outbox: a usage event JSON awaiting its ack
    pending_billed_s: float | None = None
    attachments: int = 0  # how many times a sideband attached (1 + re-attaches)
    budget_hold: str | None = None  # the session's budget hold id (services.proxy.voice.budget)

    def to_redis(self) -> dict[Any, Any]:
        return _encode(self.model_dump())

    @classmethod
    def from_redis(cls, raw: Mapping[Any, Any]) -> VoiceSession:
        return cls.model_validate({_text(k): orjson.loads(v) for k, v in raw.items()})


def _encode(fields: Mapping[str, Any]) -> dict[Any, Any]:
    """Hash fields as JSON values (so None, numbers and objects round-trip)."""
    return {k: orjson.dumps(v).decode() for k, v in fields.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class VoiceRegistry:
    """Reads and writes the registry; every method is one or two Redis round trips."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def create(self, session: VoiceSession, *, owner: str, lease_ms: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(session_key(session.id), mapping=session.to_redis())
            pipe.expire(session_key(session.id), _RECORD_TTL_S)
            pipe.set(owner_key(session.id), owner, px=lease_ms)
            pipe.sadd(LIVE_SET, session.id)
            await pipe.execute()

    async def get(self, session_id: str) -> VoiceSession | None:
        raw: Mapping[Any, Any] = await self._redis.hgetall(session_key(session_id))
        return VoiceSession.from_redis(raw) if raw else None

    async def update(self, session_id: str, **fields: Any) -> None:
        await self._redis.hset(session_key(session_id), mapping=_encode(fields))

    async def live_ids(self) -> list[str]:
        members: set[Any] = await self._redis.smembers(LIVE_SET)
        return sorted(_text(m) for m in members)

    async def owner(self, session_id: str) -> str | None:
        value = await self._redis.get(owner_key(session_id))
        return _text(value) if value else None

    async def unowned(self, session_ids: list[str]) -> list[str]:
        """The sessions among `session_ids` whose owner lease has lapsed (one round trip)."""
        if not session_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.exists(owner_key(sid))
            owned = await pipe.execute()
        return [sid for sid, held in zip(session_ids, owned, strict=True) if not held]

    async def claim(self, session_id: str, *, owner: str, lease_ms: int) -> bool:
        """Take an ownerless session's lease; True for exactly one claimant."""
        return bool(await self._redis.set(owner_key(session_id), owner, nx=True, px=lease_ms))

    async def renew(self, session_ids: list[str], *, owner: str, lease_ms: int) -> list[bool]:
        """Extend the leases `owner` still holds; False where it lost one."""
        if not session_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                await self._renew(keys=[owner_key(sid)], args=[owner, lease_ms], client=pipe)
            results = await pipe.execute()
        return [bool(r) for r in results]

    async def release(self, session_id: str, *, owner: str) -> None:
        await self._release(keys=[owner_key(session_id)], args=[owner])

    async def release_all(self, session_ids: list[str], *, owner: str) -> None:
        """Give up many leases in one round trip (a replica shutting down)."""
        if not session_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                await self._release(keys=[owner_key(sid)], args=[owner], client=pipe)
            await pipe.execute()

    async def close_requests(
        self, session_ids: list[str], token_ids: list[str]
    ) -> list[str | None]:
        """Per session: why it must end now (an operator close, a revoked token) or None."""
        if not session_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid, jti in zip(session_ids, token_ids, strict=True):
                pipe.get(close_key(sid))
                pipe.exists(revoked_key(jti))
            raw = await pipe.execute()
        out: list[str | None] = []
        for i in range(len(session_ids)):
            close, revoked = raw[2 * i], raw[2 * i + 1]
            out.append("token_revoked" if revoked else ("operator" if close else None))
        return out

    async def request_close(self, session_id: str, reason: str, ttl_s: int = 3600) -> bool:
        """Ask the owning replica to end a session; False when no such live session."""
        if not await self._redis.sismember(LIVE_SET, session_id):
            return False
        await self._redis.set(close_key(session_id), reason or "operator", ex=ttl_s)
        return True

    async def forget(self, session_id: str) -> None:
        """Drop a live-set entry whose record is gone (expired after its retention)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(LIVE_SET, session_id)
            pipe.delete(owner_key(session_id), close_key(session_id))
            await pipe.execute()

    async def mark_closed(self, session_id: str, reason: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            mapping = _encode(
                {"status": "closed", "closed_reason": reason, "closed_at": time.time()}
            )
            pipe.hset(session_key(session_id), mapping=mapping)
            pipe.srem(LIVE_SET, session_id)
            pipe.delete(close_key(session_id))
            await pipe.execute()
