"""Who may call a proxy route: the token holder's check plus the route's scope and origin.

The token, signature and nonce checks are `shared.guard.SignedRequestGuard`, shared
with token revocation; this module adds only what is proxy-specific.
"""

from __future__ import annotations

from shared.contract import Refusal
from shared.guard import Holder, SignedRequest, SignedRequestGuard, TokenCache
from shared.tokens import ProxyClaims

from .routes import Route

# The caller of a proxied request is a token holder (`shared.guard.Holder`).
Caller = Holder

__all__ = ["Caller", "TokenCache", "authenticate"]


def authenticate(
    *,
    route: Route,
    guard: SignedRequestGuard,
    request: SignedRequest,
    allowed_origins: frozenset[str],
    now: float,
) -> Holder:
    """Token, scope, origin and signature; raises an `ApiError` with a stable code."""
    origin = request.headers.get("origin")

    def fits_route(claims: ProxyClaims) -> None:
        if route.scope not in claims.scopes:
            raise Refusal.SCOPE_DENIED.error("the token does not allow this endpoint")
        if origin is not None:
            wanted = claims.origin
            allowed = origin == wanted if wanted else origin in allowed_origins
            if not allowed:
                raise Refusal.ORIGIN_MISMATCH.error("the request origin does not match the token")

    return guard.verify(request, now=now, check=fits_route)
