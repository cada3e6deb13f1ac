"""Origin policy: who may ask for tokens from a browser, and the CORS answers they get.

Browsers do not preflight every cross-origin POST, so the Origin header is checked on
the request itself, not only at preflight.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import ForbiddenError

__all__ = ["EXPOSED_HEADERS", "OriginPolicy"]

EXPOSED_HEADERS = "RateLimit, RateLimit-Policy, Retry-After, Deprecation, Sunset, Link"
_PREFLIGHT_MAX_AGE_S = "600"


class OriginPolicy:
    def __init__(self, allowed: Sequence[str]) -> None:
        self._any = "*" in allowed
        self._allowed = frozenset(o.rstrip("/").lower() for o in allowed if o != "*")

    def allows(self, origin: str) -> bool:
        return self._any or origin.rstrip("/").lower() in self._allowed

    def check(self, origin: str | None, *, required: bool) -> None:
        """Raise 403 unless `origin` is allowed (or absent where it is optional)."""
        if origin is None or origin == "":
            if required:
                raise ForbiddenError("an Origin header is required", code="origin_required")
            return
        if not self.allows(origin):
            raise ForbiddenError(
                "origin is not allowed (the server lists allowed origins in ALLOWED_ORIGINS)",
                code="origin_forbidden",
            )

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """CORS headers for an actual (non-preflight) response from an allowed origin."""
        if not origin or not self.allows(origin):
            return {"Vary": "Origin"}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }

    def preflight(
        self,
        origin: str | None,
        requested_method: str | None,
        *,
        methods: Sequence[str],
        headers: Sequence[str],
    ) -> dict[str, str]:
        """Headers for a preflight answer; 403 for a foreign origin or an unneeded method."""
        self.check(origin, required=True)
        assert origin is not None
        if (requested_method or "").upper() not in methods:
            raise ForbiddenError("method is not allowed here", code="cors_method_forbidden")
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ", ".join(methods),
            "Access-Control-Allow-Headers": ", ".join(headers),
            "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE_S,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
