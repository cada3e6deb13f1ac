"""Proxy tokens: issued by the token service, verified by the proxy.

A proxy token is a JWT (HS256) whose `kid` header names the PROXY_SIGNING_KEY that
signed it, so the signing key can rotate while live tokens keep working
(PROXY_SIGNING_KEY_PREVIOUS). Each token also has a request-signing secret derived
from the signing key and the token id (HKDF, then HMAC), so no server stores it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.crypto import b64url_encode
from shared.errors import AuthError

__all__ = [
    "ISSUER",
    "TOKEN_AUDIENCE",
    "ProxyClaims",
    "Scope",
    "TokenKeyring",
    "revoked_key",
]

TOKEN_AUDIENCE = "keyveil-proxy"  # noqa: S105 - an audience name, not a secret
ISSUER = "keyveil-token"
_ALGORITHM = "HS256"


class Scope(StrEnum):
    """Which proxy endpoint a token may call (the path below /v1)."""

    chat = "chat/completions"
    speech = "audio/speech"
    transcriptions = "audio/transcriptions"
    # Brokered voice sessions: live/sessions (GPT-Live) and realtime/calls (Realtime).
    voice = "voice"


class ProxyClaims(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    jti: str
    sid: str
    scopes: list[Scope]
    iat: int
    exp: int
    origin: str | None = None
    # The principal (shared.principals): a keyed hash of the user id, never the id itself.
    sub: str | None = None
    app: str | None = None
    tier: str | None = None
    iss: str = ISSUER
    aud: str = TOKEN_AUDIENCE


def revoked_key(token_id: str) -> str:
    """The Redis key that marks a token id as revoked until its expiry."""
    return f"kv:revoked:{{{token_id}}}"  # hash tag: the token's slot (shared.ratelimit)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class _SigningKey:
    kid: str
    token_key: bytes
    request_key_root: bytes


def _derive(secret: str) -> _SigningKey:
    raw = secret.encode()
    kid = b64url_encode(hmac.new(raw, b"keyveil-kid-v1", hashlib.sha256).digest()[:9])
    return _SigningKey(
        kid=kid,
        token_key=_hkdf(raw, b"keyveil proxy-token v1"),
        request_key_root=_hkdf(raw, b"keyveil request-signing v1"),
    )


class TokenKeyring:
    """The current signing key plus previous ones still accepted for verification."""

    def __init__(self, current: str, previous: Sequence[str] = ()) -> None:
        self._current = _derive(current)
        self._by_kid = {k.kid: k for k in (self._current, *(_derive(p) for p in previous))}

    @property
    def current_kid(self) -> str:
        return self._current.kid

    def issue_with_signing_key(self, claims: ProxyClaims) -> tuple[str, bytes]:
        """A new token and its request-signing secret, both from the current key."""
        return self.issue(claims), self._signing_key(self._current, claims.jti)

    def issue(self, claims: ProxyClaims) -> str:
        return jwt.encode(
            claims.model_dump(mode="json", exclude_none=True),
            self._current.token_key,
            algorithm=_ALGORITHM,
            headers={"kid": self._current.kid, "typ": "kv+jwt"},
        )

    def verify(self, token: str, *, now: float | None = None) -> ProxyClaims:
        """Claims of a valid, unexpired token; `AuthError` (token_invalid/expired) otherwise."""
        key = self._key_for(token)
        try:
            payload = jwt.decode(
                token,
                key.token_key,
                algorithms=[_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti"], "verify_exp": False},
            )
            claims = ProxyClaims.model_validate(payload)
        except (jwt.PyJWTError, ValidationError):
            raise AuthError("proxy token is invalid", code="token_invalid") from None
        if claims.exp <= (time.time() if now is None else now):
            raise AuthError("proxy token has expired", code="token_expired")
        return claims

    def request_signing_key(self, token: str, token_id: str) -> bytes:
        """The per-token request-signing secret, from the key that signed `token`."""
        return self._signing_key(self._key_for(token), token_id)

    @staticmethod
    def _signing_key(key: _SigningKey, token_id: str) -> bytes:
        return hmac.new(key.request_key_root, token_id.encode(), "sha256").digest()

    def _key_for(self, token: str) -> _SigningKey:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthError("proxy token is invalid", code="token_invalid") from None
        key = self._by_kid.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("proxy token is invalid", code="token_invalid")
        return key
