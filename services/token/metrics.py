"""Token service metrics. Labels are bounded: mode, result, reason; never IPs or ids."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

__all__ = [
    "AUTH_FAILURES",
    "ISSUANCE_LATENCY",
    "JWKS_FETCHES",
    "LEGACY_REQUESTS",
    "LOGIN_FAILURES",
    "TOKENS_ISSUED",
    "mode_label",
]

TOKENS_ISSUED = Counter(
    "keyveil_token_issued_total",
    "Token requests by resolved mode (realtime|proxy|demo; auto before one is resolved) "
    "and result (ok|denied|error)",
    ["mode", "result"],
)
LEGACY_REQUESTS = Counter(
    "keyveil_token_legacy_requests_total",
    "Callers of the deprecated POST /api/voice-agent/token",
)
ISSUANCE_LATENCY = Histogram(
    "keyveil_token_issuance_seconds",
    "Time to answer a token request, by resolved mode",
    ["mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

LOGIN_FAILURES = Counter(
    "keyveil_token_login_failures_total",
    "Refused logins at token issuance, by auth mode and bounded reason "
    "(required, malformed, oversized, algorithm, signature, expired, not_yet_valid, "
    "issuer, audience, unknown_key, claims, lifetime)",
    ["auth_mode", "reason"],
)
JWKS_FETCHES = Counter(
    "keyveil_token_jwks_fetches_total",
    "JWKS fetches from the identity provider (result: ok|error)",
    ["result"],
)


def _auth_failures() -> Counter:
    # The proxy registers the same family; tests import both services into one process.
    existing = REGISTRY._names_to_collectors.get("keyveil_auth_failures")
    if isinstance(existing, Counter):
        return existing
    return Counter("keyveil_auth_failures", "Authentication failures", ["service", "reason"])


AUTH_FAILURES = _auth_failures()

_MODES = frozenset({"realtime", "proxy", "demo"})


def mode_label(mode: str | None) -> str:
    return mode if mode in _MODES else "auto"
