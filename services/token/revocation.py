"""Revocation of proxy tokens: by their holder (a signed DELETE) or by an operator.

A revoked token id lives in Redis (`shared.tokens.revoked_key`) until the token would
have expired anyway; the proxy refuses it from then on.
"""

from __future__ import annotations

import hmac
import time

import redis.asyncio as aioredis

from shared.contract import Refusal
from shared.guard import SignedRequest, SignedRequestGuard, TokenCache
from shared.ratelimit import Admission, RedisUnavailableError, redis_unavailable
from shared.tokens import ProxyClaims, TokenKeyring, revoked_key

__all__ = ["Revoker", "revoke_token"]


async def revoke_token(client: aioredis.Redis, token_id: str, ttl_s: int) -> None:
    """Mark `token_id` revoked for `ttl_s` seconds; `UnavailableError` when Redis is away."""
    try:
        with redis_unavailable():
            await client.set(revoked_key(token_id), "1", ex=max(1, ttl_s))
    except RedisUnavailableError:
        raise Refusal.REVOCATION_UNAVAILABLE.error() from None


class Revoker:
    def __init__(
        self,
        *,
        redis_client: aioredis.Redis,
        keyring: TokenKeyring,
        admission: Admission,
        window_s: float,
    ) -> None:
        self._redis = redis_client
        self._guard = SignedRequestGuard(
            tokens=TokenCache(keyring, max_entries=1_000),
            admission=admission,
            window_s=window_s,
        )

    async def revoke_signed(
        self, *, token_id: str, request: SignedRequest, client_ip: str
    ) -> ProxyClaims:
        """Revoke `token_id` when the request proves possession of that token.

        Proof: `Authorization: Bearer <token>` for the same token id, and an RFC 9421
        signature (keyid = token id) made with the token's request-signing key - the
        proxy's check (`shared.guard.SignedRequestGuard`). Revoking twice is not refused.
        """

        def names_path(claims: ProxyClaims) -> None:
            if not hmac.compare_digest(claims.jti.encode(), token_id.encode()):
                raise Refusal.TOKEN_MISMATCH.error()

        holder = self._guard.verify(request, now=time.time(), check=names_path)
        await self._guard.admit(holder, client_ip=client_ip, refuse_revoked=False)
        claims = holder.claims
        await revoke_token(self._redis, token_id, claims.exp - int(time.time()))
        return claims
