"""Revocation of proxy tokens: by their holder (a signed DELETE) or by an operator.

A revoked token id lives in Redis (`shared.tokens.revoked_key`) until the token would
have expired anyway; the proxy refuses it from then on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis.asyncio as aioredis

from shared.errors import AuthError, ForbiddenError, RateLimitedError, UnavailableError
from shared.ratelimit import Admission, RedisUnavailableError, redis_unavailable
from shared.signing import SignatureError, verify_request
from shared.tokens import ProxyClaims, TokenKeyring, revoked_key

__all__ = ["Revoker", "revoke_token"]


async def revoke_token(client: aioredis.Redis, token_id: str, ttl_s: int) -> None:
    """Mark `token_id` revoked for `ttl_s` seconds; `UnavailableError` when Redis is away."""
    try:
        with redis_unavailable():
            await client.set(revoked_key(token_id), "1", ex=max(1, ttl_s))
    except RedisUnavailableError:
        raise UnavailableError(
            "revocation store is unavailable", code="revocation_unavailable"
        ) from None


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
        self._keyring = keyring
        self._admission = admission
        self._window_s = window_s

    async def revoke_signed(
        self,
        *,
        token_id: str,
        method: str,
        path: str,
        query: str,
        authority: str,
        headers: Mapping[str, str],
        body: bytes,
        client_ip: str,
    ) -> ProxyClaims:
        """Revoke `token_id` when the request proves possession of that token.

        Proof: `Authorization: Bearer <token>` for the same token id, and an RFC 9421
        signature (keyid = token id) made with the token's request-signing key.
        """
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("a Bearer proxy token is required", code="missing_token")
        token = token.strip()
        claims = self._keyring.verify(token)
        if claims.jti != token_id:
            raise ForbiddenError("the token does not match the path", code="token_mismatch")
        key = self._keyring.request_signing_key(token, token_id)

        def key_for(keyid: str) -> bytes:
            if keyid != token_id:
                raise SignatureError("unknown signing key", code="signature_unknown_key")
            return key

        verified = verify_request(
            method=method,
            path=path,
            query=query,
            authority=authority,
            headers=headers,
            body=body,
            key_for=key_for,
            now=time.time(),
            window_s=self._window_s,
        )
        decision = await self._admission.check(
            limits=[],
            client_ip=client_ip,
            nonce=f"{token_id}:{verified.nonce}",
            nonce_ttl_s=int(self._window_s * 2) + 1,
        )
        if decision.reason == "replay":
            raise AuthError("this signature was already used", code="replay")
        if decision.reason == "blocked":
            raise RateLimitedError(
                "client is temporarily blocked", code="blocked", headers=decision.headers()
            )
        if not decision.allowed:
            raise UnavailableError("replay protection is unavailable", code="unavailable")
        await revoke_token(self._redis, token_id, claims.exp - int(time.time()))
        return claims
