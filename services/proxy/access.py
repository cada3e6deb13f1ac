"""Who may call: the proxy token, its scope and origin, and the request signature.

Everything here is CPU only; the shared-state checks (nonce, limits, revocation,
IP block) happen afterwards in one Redis round trip (`shared.ratelimit.Admission`).
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import ApiError, AuthError, ForbiddenError
from shared.signing import VerifiedSignature, verify_request
from shared.tokens import ProxyClaims, TokenKeyring

from .routes import Route

__all__ = ["Caller", "TokenCache", "authenticate", "rejection_reason"]

# Error code -> the bounded `reason` label of keyveil_proxy_rejections_total.
_REASONS = {
    "token_missing": "invalid_token",
    "token_invalid": "invalid_token",
    "token_expired": "expired",
    "token_revoked": "revoked",
    "scope_denied": "scope",
    "origin_mismatch": "origin",
    "signature_expired": "expired",
    "signature_future": "expired",
    "replay_detected": "replay",
    "rate_limited": "rate_limited",
    "ip_blocked": "blocked",
    "digest_missing": "digest",
    "digest_malformed": "digest",
    "digest_unsupported": "digest",
    "digest_mismatch": "digest",
    "security_unavailable": "unavailable",
    "body_timeout": "body_timeout",
    "upload_capacity": "upload_capacity",
    # A request or voice session outside the server's usage policy: refused, but not
    # an auth failure (no IP strike: blocking would also block everyone behind a NAT).
    "model_not_allowed": "policy",
    "model_required": "policy",
    "policy_limit_exceeded": "policy",
    "voice_not_allowed": "policy",
    "instructions_not_allowed": "policy",
    "tool_not_allowed": "policy",
    "session_field_not_allowed": "policy",
}


def rejection_reason(error: ApiError) -> str:
    if error.code in _REASONS:
        return _REASONS[error.code]
    if error.code.startswith("signature_"):
        return "signature"
    return "bad_request"


@dataclass(frozen=True)
class _Verified:
    claims: ProxyClaims
    signing_key: bytes


class TokenCache:
    """Verified tokens by token string, in a bounded LRU.

    Verifying a JWT costs ~100 us; a browser reuses one token for many calls. The
    cache keeps only tokens that verified, and expiry is re-checked on every use.
    """

    def __init__(self, keyring: TokenKeyring, max_entries: int = 10_000) -> None:
        self._keyring = keyring
        self._max = max_entries
        self._entries: OrderedDict[str, _Verified] = OrderedDict()

    def verify(self, token: str, now: float) -> tuple[ProxyClaims, bytes]:
        entry = self._entries.get(token)
        if entry is None:
            claims = self._keyring.verify(token, now=now)
            entry = _Verified(claims, self._keyring.request_signing_key(token, claims.jti))
            self._entries[token] = entry
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(token)
            if entry.claims.exp <= now:
                del self._entries[token]
                raise AuthError("proxy token has expired", code="token_expired")
        return entry.claims, entry.signing_key


@dataclass(frozen=True)
class Caller:
    claims: ProxyClaims
    signature: VerifiedSignature


def bearer_token(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization: Bearer <proxy token> is required", code="token_missing")
    return token.strip()


def authenticate(
    *,
    route: Route,
    tokens: TokenCache,
    headers: Mapping[str, str],
    method: str,
    path: str,
    query: str,
    authority: str,
    scheme: str,
    allowed_origins: frozenset[str],
    now: float,
    window_s: float,
) -> Caller:
    """Token, scope, origin and signature; raises an `ApiError` with a stable code."""
    claims, signing_key = tokens.verify(bearer_token(headers), now)
    if route.scope not in claims.scopes:
        raise ForbiddenError("the token does not allow this endpoint", code="scope_denied")
    origin = headers.get("origin")
    if origin is not None:
        wanted = claims.origin
        allowed = origin == wanted if wanted else origin in allowed_origins
        if not allowed:
            raise ForbiddenError(
                "the request origin does not match the token", code="origin_mismatch"
            )

    def key_for(keyid: str) -> bytes:
        if not hmac.compare_digest(keyid.encode(), claims.jti.encode()):
            raise AuthError("keyid does not name this token", code="signature_unknown_key")
        return signing_key

    signature = verify_request(
        method=method,
        path=path,
        query=query,
        authority=authority,
        scheme=scheme,
        headers=headers,
        body=None,  # the body is streamed and checked against the digest while read
        require_digest=True,
        key_for=key_for,
        now=now,
        window_s=window_s,
    )
    return Caller(claims, signature)
