"""One check for "a signed request by a token holder", used by both edges.

A request passes when it carries `Authorization: Bearer <proxy token>` that verifies,
an RFC 9421 signature whose keyid names that token (compared in constant time) made
with the token's request-signing key, and a nonce not seen within `nonce_ttl_s` - the
last checked in the same Redis round trip as the rate limits, revocation and IP block
(`shared.ratelimit.Admission`). The proxy (`services.proxy.access` + its handler) and
token revocation (`services.token.revocation`) both go through `SignedRequestGuard`,
so they cannot drift apart; every refusal is a `shared.contract.Refusal`.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from shared.contract import Refusal
from shared.ratelimit import Admission, Decision, Limit, RiderCall
from shared.signing import VerifiedSignature, verify_request
from shared.tokens import ProxyClaims, TokenKeyring

__all__ = [
    "Holder",
    "SignedRequest",
    "SignedRequestGuard",
    "TokenCache",
    "bearer_token",
    "nonce_ttl_s",
]


def nonce_ttl_s(window_s: float) -> int:
    """A nonce must outlive every moment its `created` is still acceptable (+- window)."""
    return math.ceil(2 * window_s) + 1


def bearer_token(headers: Mapping[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refusal.TOKEN_MISSING.error("Authorization: Bearer <proxy token> is required")
    return token.strip()


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
                raise Refusal.TOKEN_EXPIRED.error("proxy token has expired")
        return entry.claims, entry.signing_key


@dataclass(frozen=True)
class SignedRequest:
    """The request target and what the signature covers; `body=None` when streamed."""

    method: str
    path: str
    query: str
    authority: str
    scheme: str
    headers: Mapping[str, str]
    body: bytes | None = None


@dataclass(frozen=True)
class Holder:
    """A caller that proved possession of a proxy token."""

    claims: ProxyClaims
    signature: VerifiedSignature


class SignedRequestGuard:
    """Token + signature + nonce + limits, for one edge's request target."""

    def __init__(
        self,
        *,
        tokens: TokenCache,
        admission: Admission,
        window_s: float,
        require_digest: bool | None = None,
    ) -> None:
        self._tokens = tokens
        self._admission = admission
        self._window_s = window_s
        self._require_digest = require_digest
        self.nonce_ttl_s = nonce_ttl_s(window_s)

    def verify(
        self,
        request: SignedRequest,
        *,
        now: float,
        check: Callable[[ProxyClaims], None] | None = None,
    ) -> Holder:
        """CPU-only part; `check` refuses claims that do not fit the target (scope, path)."""
        claims, signing_key = self._tokens.verify(bearer_token(request.headers), now)
        if check is not None:
            check(claims)
        expected = claims.jti.encode()

        def key_for(keyid: str) -> bytes:
            if not hmac.compare_digest(keyid.encode(), expected):
                raise Refusal.SIGNATURE_UNKNOWN_KEY.error("keyid does not name this token")
            return signing_key

        signature = verify_request(
            method=request.method,
            path=request.path,
            query=request.query,
            authority=request.authority,
            scheme=request.scheme,
            headers=request.headers,
            body=request.body,
            require_digest=self._require_digest,
            key_for=key_for,
            now=now,
            window_s=self._window_s,
        )
        return Holder(claims, signature)

    async def admit(
        self,
        holder: Holder,
        *,
        client_ip: str,
        limits: Sequence[Limit] = (),
        refuse_revoked: bool = True,
        rider: RiderCall | None = None,
    ) -> Decision:
        """Nonce, limits, revocation and IP block in one round trip; raises the refusal.

        A refusal by the `rider` (a budget, in the same round trip) is returned, not
        raised: the rider's owner names it (services.proxy.spend)."""
        claims = holder.claims
        decision = await self._admission.check(
            limits=limits,
            client_ip=client_ip,
            nonce=f"{claims.jti}:{holder.signature.nonce}",
            nonce_ttl_s=self.nonce_ttl_s,
            revoked_token_id=claims.jti if refuse_revoked else None,
            revoked_user=(claims.sub, claims.iat) if refuse_revoked and claims.sub else None,
            rider=rider,
        )
        if not decision.allowed and not decision.rider_refused:
            refusal = decision.refusal or Refusal.SECURITY_UNAVAILABLE
            raise refusal.error(headers=decision.headers())
        return decision
