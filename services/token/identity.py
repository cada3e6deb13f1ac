"""Who is asking for a token: the app's login (OIDC), its backend's assertion, or nobody.

`KEYVEIL_AUTH_MODE` picks one `Authenticator`:

- `oidc`: `Authorization: Bearer <JWT>` from the app's identity provider, verified
  against its JWKS (`JwksKeys`: fetched with PyJWT's `PyJWKClient` in a worker thread,
  kept while the provider is away, refreshed on an unknown `kid` at most once per
  OIDC_JWKS_MIN_REFRESH_S, a caller waiting at most OIDC_JWKS_TIMEOUT_S);
- `assertion`: a short JWT the app's backend signs for its user (HS256 with
  KEYVEIL_ASSERTION_KEY, or EdDSA checked with KEYVEIL_ASSERTION_PUBLIC_KEY);
- `anonymous`: no login; only with an explicit opt-in in production.

Errors (all `ApiError`, mapped once in the HTTP edge):

    LoginError(AuthError)                 401 login_required | login_invalid | login_expired
    IdentityUnavailableError(Unavailable) 503 identity_unavailable (no keys to check with)

`LoginError.why` is a bounded label (metrics, event reasons); messages never echo the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.token.metrics import JWKS_FETCHES
from services.token.settings import ASYMMETRIC_ALGORITHMS, Settings, parse_ed25519_public_key
from shared.errors import AuthError, UnavailableError
from shared.principals import Principal, PrincipalHasher

__all__ = [
    "MAX_LOGIN_BYTES",
    "AnonymousAuth",
    "AssertionAuth",
    "Authenticator",
    "ClaimRules",
    "IdentityUnavailableError",
    "JwksKeys",
    "LoginError",
    "OidcAuth",
    "authenticator_for",
]

log = logging.getLogger(__name__)

MAX_LOGIN_BYTES = 8192
_MAX_SUB_CHARS = 256
_MAX_LABEL_CHARS = 64


# PyJWT's exceptions -> (code, why). Order matters: subclasses first.
_DECODE_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "login_expired", "expired"),
    (jwt.ImmatureSignatureError, "login_invalid", "not_yet_valid"),
    (jwt.InvalidIssuerError, "login_invalid", "issuer"),
    (jwt.InvalidAudienceError, "login_invalid", "audience"),
    (jwt.MissingRequiredClaimError, "login_invalid", "claims"),
    (jwt.InvalidAlgorithmError, "login_invalid", "algorithm"),
    (jwt.InvalidSignatureError, "login_invalid", "signature"),
    (jwt.DecodeError, "login_invalid", "malformed"),
)


class LoginError(AuthError):
    """The caller's login is missing or not acceptable; `why` is a bounded reason."""

    def __init__(self, message: str, *, code: str = "login_invalid", why: str) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})
        self.why = why


class IdentityUnavailableError(UnavailableError):
    """No key to check a login with (the identity provider is unreachable)."""

    def __init__(self) -> None:
        super().__init__(
            "the identity provider cannot be reached; try again shortly",
            code="identity_unavailable",
            headers={"Retry-After": "5"},
        )


class Authenticator(Protocol):
    mode: str

    async def authenticate(self, headers: Mapping[str, str], *, origin: str | None) -> Principal:
        """The caller's principal; `LoginError` or `IdentityUnavailableError` otherwise."""
        ...

    async def aclose(self) -> None:
        """Stop background work (a JWKS refresh in flight)."""
        ...


def _app_from_origin(origin: str | None) -> str | None:
    if not origin:
        return None
    return urlsplit(origin).netloc.lower() or None


@dataclass(frozen=True)
class ClaimRules:
    """How verified claims become a principal."""

    hasher: PrincipalHasher
    tier_claim: str | None = "tier"
    app_claim: str | None = "app"
    known_tiers: Callable[[], frozenset[str]] = frozenset

    def principal(self, claims: Mapping[str, Any], *, origin: str | None) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB_CHARS:
            raise LoginError("the login has no usable subject", why="claims")
        app = claims.get(self.app_claim) if self.app_claim else None
        if not (isinstance(app, str) and 0 < len(app) <= _MAX_LABEL_CHARS):
            app = _app_from_origin(origin)
        return Principal(sub=self.hasher.hash(sub), app=app, tier=self._tier(claims))

    def _tier(self, claims: Mapping[str, Any]) -> str | None:
        value = claims.get(self.tier_claim) if self.tier_claim else None
        if isinstance(value, str) and 0 < len(value) <= _MAX_LABEL_CHARS:
            return value
        if isinstance(value, list):
            # A groups claim: the first group the policy has a tier for.
            known = self.known_tiers()
            return next((g for g in value if isinstance(g, str) and g in known), None)
        return None


def bearer_login(headers: Mapping[str, str]) -> str:
    """The Bearer credential, bounded in size; `LoginError` when absent or oversized."""
    value = headers.get("authorization", "")
    if not value:
        raise LoginError(
            "Authorization: Bearer <login token> is required", code="login_required", why="required"
        )
    if len(value) > MAX_LOGIN_BYTES:
        raise LoginError("the login token is too large", why="oversized")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise LoginError(
            "Authorization must be: Bearer <login token>", code="login_required", why="required"
        )
    return token


def _unverified_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise LoginError("the login token is malformed", why="malformed") from None
    if not isinstance(header, dict):
        raise LoginError("the login token is malformed", why="malformed")
    return header


def _decode(
    token: str,
    key: Any,
    *,
    algorithm: str,
    issuer: str,
    audience: str | Sequence[str],
    leeway_s: float,
) -> dict[str, Any]:
    """Verified claims, or `LoginError` with the reason PyJWT found."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway_s,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.PyJWTError as exc:
        for kind, code, why in _DECODE_ERRORS:
            if isinstance(exc, kind):
                message = "the login has expired" if why == "expired" else "the login is invalid"
                raise LoginError(message, code=code, why=why) from None
        raise LoginError("the login is invalid", why="claims") from None
    except (ValueError, TypeError, OverflowError):
        raise LoginError("the login token is malformed", why="malformed") from None
    return claims


class AnonymousAuth:
    """Today's behaviour: no login; the app is the requesting origin."""

    mode = "anonymous"

    async def authenticate(self, headers: Mapping[str, str], *, origin: str | None) -> Principal:
        return Principal(sub=None, app=_app_from_origin(origin))

    async def aclose(self) -> None:
        return None


class JwksKeys:
    """The identity provider's signing keys by `kid`, fetched off the event loop.

    Keys are refreshed in the background once older than `refresh_after_s`, kept
    through an outage for `max_stale_s`, and refreshed on demand for an unknown `kid`
    at most once per `min_refresh_s` (so junk `kid`s cannot make us hammer the IdP).
    A caller waits at most `timeout_s` for a fetch.
    """

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str | None,
        algorithms: frozenset[str],
        timeout_s: float = 2.0,
        min_refresh_s: float = 30.0,
        refresh_after_s: float = 300.0,
        max_stale_s: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuer = issuer
        self._jwks_url = jwks_url
        self._algorithms = algorithms
        self._timeout_s = timeout_s
        self._min_refresh_s = min_refresh_s
        self._refresh_after_s = refresh_after_s
        self._max_stale_s = max_stale_s
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._inflight: asyncio.Task[None] | None = None

    @property
    def fetched(self) -> bool:
        return bool(self._keys)

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        now = self._clock()
        if self._keys and now - self._fetched_at > self._max_stale_s:
            log.warning("JWKS keys are older than OIDC_JWKS_MAX_STALE_S; dropping them")
            self._keys = {}
        key = self._lookup(kid)
        if key is not None:
            if now - self._fetched_at > self._refresh_after_s:
                self._start_refresh(now)  # in the background: this request goes on
            return key
        if self._start_refresh(now) is not None:
            await self._wait_for_refresh()
            key = self._lookup(kid)
            if key is not None:
                return key
        if not self._keys:
            raise IdentityUnavailableError
        raise LoginError("the login was signed with an unknown key", why="unknown_key")

    async def aclose(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # Without a kid, only a provider with exactly one key is unambiguous.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _start_refresh(self, now: float) -> asyncio.Task[None] | None:
        if self._inflight is not None and not self._inflight.done():
            return self._inflight
        if now - self._attempted_at < self._min_refresh_s:
            return None
        self._attempted_at = now
        self._inflight = asyncio.get_running_loop().create_task(self._refresh())
        return self._inflight

    async def _wait_for_refresh(self) -> None:
        task = self._inflight
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self._timeout_s)
        except TimeoutError:
            log.warning("JWKS refresh did not finish within OIDC_JWKS_TIMEOUT_S")

    async def _refresh(self) -> None:
        try:
            keys = await asyncio.to_thread(self._fetch)
        # Whatever the IdP sends (or fails to), a refresh must not become a caller's 5xx:
        # the callers see "keys as before", then 401 unknown_key or 503 identity_unavailable.
        except Exception as exc:
            JWKS_FETCHES.labels("error").inc()
            log.warning(
                "JWKS fetch failed (%s); keeping %d cached key(s)",
                type(exc).__name__,
                len(self._keys),
            )
            return
        JWKS_FETCHES.labels("ok").inc()
        self._keys = keys
        self._fetched_at = self._clock()

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        """Runs in a worker thread: discovery (once), then the key set."""
        if self._jwks_url is None:
            self._jwks_url = self._discover()
        client = jwt.PyJWKClient(self._jwks_url, cache_jwk_set=False, timeout=self._timeout_s)
        keys: dict[str, jwt.PyJWK] = {}
        for key in client.get_jwk_set().keys:
            usable = (
                key.algorithm_name in self._algorithms
                and key.key_type != "oct"
                and key.public_key_use in (None, "sig")
            )
            if usable:
                keys[key.key_id or ""] = key
        if not keys:
            raise ValueError("the JWKS has no usable signing key")
        return keys

    def _discover(self) -> str:
        url = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        answer = httpx.get(url, timeout=self._timeout_s, follow_redirects=False)
        answer.raise_for_status()
        document = answer.json()
        if not isinstance(document, dict) or document.get("issuer") != self._issuer:
            raise ValueError("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        scheme = ("https://",) if self._issuer.startswith("https://") else ("https://", "http://")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(scheme):
            raise ValueError("the discovery document has no usable jwks_uri")
        return jwks_uri


class _VerifiedLogins:
    """Logins that verified, by SHA-256 of the token, for a short while.

    A browser shows the same login for every token refresh during its lifetime; checking
    its signature again each time costs ~150 us of CPU. An entry lives until the login
    expires or `ttl_s` passes, whichever is first, so a key the IdP withdraws stops
    working within `ttl_s` even for cached logins.
    """

    def __init__(self, *, ttl_s: float = 60.0, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, key: bytes, now: float) -> Principal | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, principal = entry
        if until <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return principal

    def put(self, key: bytes, principal: Principal, *, exp: Any, now: float) -> None:
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            return
        self._entries[key] = (min(float(exp), now + self._ttl_s), principal)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)


class OidcAuth:
    """The app's OIDC login (ID or access token), checked against the issuer's JWKS."""

    mode = "oidc"

    def __init__(
        self,
        *,
        keys: JwksKeys,
        issuer: str,
        audience: str | Sequence[str],
        algorithms: frozenset[str],
        leeway_s: float,
        rules: ClaimRules,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._algorithms = algorithms
        self._leeway_s = leeway_s
        self._rules = rules
        self._verified = _VerifiedLogins()

    async def authenticate(self, headers: Mapping[str, str], *, origin: str | None) -> Principal:
        token = bearer_login(headers)
        # The app claim may fall back to the origin: the cache is per (login, origin).
        cache_key = _VerifiedLogins.key(f"{origin or ''} {token}")
        now = time.time()
        cached = self._verified.get(cache_key, now)
        if cached is not None:
            return cached
        header = _unverified_header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise LoginError("the login's algorithm is not accepted", why="algorithm")
        kid = header.get("kid")
        if kid is not None and not (isinstance(kid, str) and len(kid) <= 256):
            raise LoginError("the login token is malformed", why="malformed")
        key = await self._keys.key_for(kid)
        if key.algorithm_name != algorithm:
            raise LoginError("the login's algorithm does not match its key", why="algorithm")
        claims = _decode(
            token,
            key,
            algorithm=algorithm,
            issuer=self._issuer,
            audience=self._audience,
            leeway_s=self._leeway_s,
        )
        principal = self._rules.principal(claims, origin=origin)
        self._verified.put(cache_key, principal, exp=claims.get("exp"), now=now)
        return principal

    async def aclose(self) -> None:
        await self._keys.aclose()


class AssertionAuth:
    """A short-lived assertion from the app's backend: HS256 (shared key) or EdDSA."""

    mode = "assertion"

    def __init__(
        self,
        *,
        key: bytes | Ed25519PublicKey,
        issuer: str,
        audience: str,
        max_lifetime_s: int,
        leeway_s: float,
        rules: ClaimRules,
    ) -> None:
        self._key = key
        self._algorithm = "HS256" if isinstance(key, bytes) else "EdDSA"
        self._issuer = issuer
        self._audience = audience
        self._max_lifetime_s = max_lifetime_s
        self._leeway_s = leeway_s
        self._rules = rules

    async def authenticate(self, headers: Mapping[str, str], *, origin: str | None) -> Principal:
        token = bearer_login(headers)
        header = _unverified_header(token)
        if header.get("alg") != self._algorithm:
            raise LoginError("the assertion's algorithm is not accepted", why="algorithm")
        claims = _decode(
            token,
            self._key,
            algorithm=self._algorithm,
            issuer=self._issuer,
            audience=self._audience,
            leeway_s=self._leeway_s,
        )
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise LoginError("the assertion is invalid", why="claims")
        if exp - iat > self._max_lifetime_s or iat > time.time() + self._leeway_s:
            raise LoginError("the assertion lives too long", why="lifetime")
        return self._rules.principal(claims, origin=origin)

    async def aclose(self) -> None:
        return None


def authenticator_for(
    settings: Settings, *, known_tiers: Callable[[], frozenset[str]]
) -> Authenticator:
    """The `Authenticator` KEYVEIL_AUTH_MODE names (settings were validated already)."""
    if settings.auth_mode == "anonymous":
        return AnonymousAuth()
    rules = ClaimRules(
        hasher=settings.principal_hasher(),
        tier_claim=settings.tier_claim or None,
        app_claim=settings.app_claim or None,
        known_tiers=known_tiers,
    )
    if settings.auth_mode == "oidc":
        assert settings.oidc_issuer is not None
        algorithms = frozenset(settings.oidc_algorithms) & ASYMMETRIC_ALGORITHMS
        keys = JwksKeys(
            issuer=settings.oidc_issuer,
            jwks_url=settings.oidc_jwks_url,
            algorithms=algorithms,
            timeout_s=settings.oidc_jwks_timeout_s,
            min_refresh_s=settings.oidc_jwks_min_refresh_s,
            refresh_after_s=settings.oidc_jwks_cache_s,
            max_stale_s=settings.oidc_jwks_max_stale_s,
        )
        audience = settings.oidc_audience
        return OidcAuth(
            keys=keys,
            issuer=settings.oidc_issuer,
            audience=audience[0] if len(audience) == 1 else audience,
            algorithms=algorithms,
            leeway_s=settings.oidc_leeway_s,
            rules=rules,
        )
    assert settings.assertion_issuer is not None
    key: bytes | Ed25519PublicKey = (
        settings.assertion_key.get_secret_value().encode()
        if settings.assertion_key is not None
        else parse_ed25519_public_key(settings.assertion_public_key or "")
    )
    return AssertionAuth(
        key=key,
        issuer=settings.assertion_issuer,
        audience=settings.assertion_audience,
        max_lifetime_s=settings.assertion_max_lifetime_s,
        leeway_s=settings.oidc_leeway_s,
        rules=rules,
    )
