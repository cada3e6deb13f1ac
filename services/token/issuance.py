"""Which credential a client gets: realtime, proxy, demo, or auto (realtime, else proxy)."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.token.models import TokenRequest
from services.token.realtime import RealtimeMinter, SessionPolicy
from shared.crypto import b64url_encode
from shared.errors import BadRequestError, UnavailableError, UpstreamError, UpstreamTimeoutError
from shared.principals import Principal
from shared.tokens import ProxyClaims, Scope, TokenKeyring

__all__ = ["Issued", "TokenIssuer"]

# Failures that make `auto` fall back to a proxy token rather than fail the request.
_FALLBACK_ERRORS = (UnavailableError, UpstreamError, UpstreamTimeoutError)


@dataclass(frozen=True)
class Issued:
    body: dict[str, Any]
    mode: str
    token_id: str | None = None
    session_id: str | None = None
    fallback_reason: str | None = None
    principal: Principal | None = None


class TokenIssuer:
    def __init__(
        self,
        *,
        keyring: TokenKeyring,
        minter: RealtimeMinter,
        policy: SessionPolicy,
        duration_s: int,
        proxy_url: str,
        scopes: Sequence[str],
        demo_mode: bool,
    ) -> None:
        self._keyring = keyring
        self._minter = minter
        self._policy = policy
        self._duration_s = duration_s
        self._proxy_url = proxy_url
        self._scopes = list(scopes)
        self._demo_mode = demo_mode

    async def issue(
        self, request: TokenRequest, *, origin: str | None, principal: Principal | None = None
    ) -> Issued:
        if request.mode == "demo" and not self._demo_mode:
            raise BadRequestError("demo mode is not enabled", code="demo_disabled")
        who = principal or Principal(sub=None)
        scopes = self._scopes_for(request.scopes)
        if self._demo_mode:
            # No upstream call is ever made in demo mode, whatever was asked for.
            return self._proxy(scopes, origin, who, mode="demo")
        if request.mode == "proxy":
            return self._proxy(scopes, origin, who, mode="proxy")
        session = self._policy.resolve(request.session, tier=who.tier)
        if request.mode == "realtime":
            body = await self._minter.mint(session)
            return Issued(body=body, mode="realtime", principal=who)
        try:
            body = await self._minter.mint(session)
            return Issued(body=body, mode="realtime", principal=who)
        except _FALLBACK_ERRORS as exc:
            fallback = self._proxy(scopes, origin, who, mode="proxy")
            fallback.body["fallback_reason"] = exc.code
            return Issued(
                body=fallback.body,
                mode="proxy",
                token_id=fallback.token_id,
                session_id=fallback.session_id,
                fallback_reason=exc.code,
                principal=who,
            )

    def _scopes_for(self, wanted: list[str] | None) -> list[str]:
        if wanted is None:
            return list(self._scopes)
        if not wanted or any(scope not in self._scopes for scope in wanted):
            raise BadRequestError(
                f"scopes must be a non-empty subset of {', '.join(self._scopes)}",
                code="scope_not_allowed",
            )
        return list(dict.fromkeys(wanted))

    def _proxy(
        self, scopes: list[str], origin: str | None, principal: Principal, *, mode: str
    ) -> Issued:
        token_id = secrets.token_urlsafe(18)
        session_id = uuid.uuid4().hex
        now = int(time.time())
        claims = ProxyClaims(
            jti=token_id,
            sid=session_id,
            scopes=[Scope(s) for s in scopes],
            iat=now,
            exp=now + self._duration_s,
            origin=origin or None,
            sub=principal.sub,
            app=principal.app,
            tier=principal.tier,
        )
        token, raw_signing_key = self._keyring.issue_with_signing_key(claims)
        signing_key = b64url_encode(raw_signing_key)
        body: dict[str, Any] = {
            "mode": mode,
            "token": token,
            "token_id": token_id,
            "session_id": session_id,
            "signing_key": signing_key,
            "expires_at": claims.exp,
            "proxy_url": self._proxy_url,
            "scopes": scopes,
        }
        return Issued(
            body=body, mode=mode, token_id=token_id, session_id=session_id, principal=principal
        )
