"""Token service settings: names from docs/contracts.md, rules that refuse a bad setup."""

from __future__ import annotations

from typing import Literal, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import Field, SecretStr, field_validator, model_validator

from shared.crypto import b64url_decode
from shared.errors import ConfigError
from shared.principals import PrincipalHasher
from shared.ratelimit import FailureMode
from shared.settings import (
    CommaList,
    EdgeSettings,
    check_secret_strength,
    public_url_problem,
    split_commas,
)
from shared.tokens import Scope

__all__ = ["ASYMMETRIC_ALGORITHMS", "AuthMode", "Settings", "parse_ed25519_public_key"]

DEFAULT_REALTIME_MODELS = ["gpt-realtime", "gpt-realtime-mini"]
DEFAULT_REALTIME_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse"]
DEFAULTASYMMETRIC_ALGORITHMS = ["RS256", "ES256", "EdDSA"]
# Asymmetric only: an HS* allowlist would let a JWKS's public key be used as an HMAC secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
AuthMode = Literal["anonymous", "oidc", "assertion"]


def parse_ed25519_public_key(value: str) -> Ed25519PublicKey:
    """A PEM public key, or the raw 32-byte key in base64url; ValueError otherwise."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        key = load_pem_public_key(text.encode())
    else:
        key = Ed25519PublicKey.from_public_bytes(b64url_decode(text))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


class Settings(EdgeSettings):
    """Environment of `python -m services.token`."""

    port: int = Field(default=8080, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    """TCP port the service listens on (HTTP: API, /healthz, /readyz, /metrics)."""

    rate_limit_per_minute: int = Field(
        default=10, ge=1, le=100_000, validation_alias="VOICE_AGENT_RATE_LIMIT"
    )
    """Token issuances per client IP per minute."""
    rate_limit_failure_mode: FailureMode = Field(
        default=FailureMode.closed, validation_alias="TOKEN_RATE_LIMIT_FAILURE_MODE"
    )
    """What issuance does when Redis is unreachable: closed (refuse), open (allow) or local
    (a per-process limit)."""
    block_after_strikes: int = Field(
        default=20, ge=1, validation_alias="RATE_LIMIT_BLOCK_AFTER_STRIKES"
    )
    """Auth failures or limit hits within RATE_LIMIT_STRIKE_WINDOW_S that block a client IP
    (`keyveil blocks` lists and lifts blocks)."""
    strike_window_s: float = Field(
        default=60.0, gt=0, validation_alias="RATE_LIMIT_STRIKE_WINDOW_S"
    )
    """Seconds over which strikes are counted."""
    block_for_s: float = Field(default=300.0, gt=0, validation_alias="RATE_LIMIT_BLOCK_FOR_S")
    """Seconds a blocked client IP stays blocked."""

    token_duration_s: int = Field(
        default=300, ge=10, le=7200, validation_alias="VOICE_AGENT_TOKEN_DURATION"
    )
    """Lifetime of an issued token in seconds."""
    allowed_origins: CommaList = Field(
        default_factory=lambda: ["http://localhost:3000", "http://127.0.0.1:3000"],
        validation_alias="ALLOWED_ORIGINS",
    )
    """Comma-separated browser origins (scheme://host[:port]) allowed to get tokens and call the
    proxy; https only in production, never '*'."""
    upstream_timeout_s: float = Field(
        default=5.0, gt=0, le=60, validation_alias="TOKEN_UPSTREAM_TIMEOUT_S"
    )
    """Seconds to wait for OpenAI when minting a realtime client secret."""
    proxy_public_url: str = Field(
        default="http://127.0.0.1:8081/api/voice-agent/proxy/v1",
        validation_alias="PROXY_PUBLIC_URL",
    )
    """The proxy's public base URL that issued tokens tell browsers to call (the ingress host +
    /api/voice-agent/proxy/v1); https and not loopback in production."""
    proxy_scopes: CommaList = Field(
        default_factory=lambda: [s.value for s in Scope], validation_alias="PROXY_SCOPES"
    )
    """Comma-separated scopes a proxy token carries (which proxy endpoints it may call)."""
    realtime_models: CommaList = Field(
        default_factory=lambda: list(DEFAULT_REALTIME_MODELS), validation_alias="REALTIME_MODELS"
    )
    """Comma-separated realtime models a client may ask for."""
    realtime_voices: CommaList = Field(
        default_factory=lambda: list(DEFAULT_REALTIME_VOICES), validation_alias="REALTIME_VOICES"
    )
    """Comma-separated realtime voices a client may ask for."""
    max_body_bytes: int = Field(
        default=16_384, ge=256, le=1_048_576, validation_alias="TOKEN_MAX_BODY_BYTES"
    )
    """Largest token request body accepted, in bytes."""
    legacy_deprecated_at: int = Field(
        default=1_767_225_600, ge=0, validation_alias="LEGACY_TOKEN_DEPRECATED_AT"
    )
    """Unix time from which the legacy /api/voice-agent/token answers carry a Deprecation
    header."""
    legacy_sunset_at: int = Field(
        default=1_798_761_600, ge=0, validation_alias="LEGACY_TOKEN_SUNSET_AT"
    )
    """Unix time after which the legacy /api/voice-agent/token endpoint is gone (Sunset
    header)."""

    # -- who may ask (services/token/identity.py) --
    auth_mode: AuthMode = Field(default="anonymous", validation_alias="KEYVEIL_AUTH_MODE")
    """Who may get tokens: oidc (the app's login), assertion (signed by the app's backend) or
    anonymous (production only with KEYVEIL_ALLOW_ANONYMOUS=true)."""
    allow_anonymous: bool = Field(default=False, validation_alias="KEYVEIL_ALLOW_ANONYMOUS")
    """Explicit opt-in to anonymous issuance in production."""
    principal_key: SecretStr | None = Field(default=None, validation_alias="KEYVEIL_PRINCIPAL_KEY")
    """Key of the user-id hash carried in tokens and events (default: derived from
    PROXY_SIGNING_KEY); token and proxy must agree."""
    tier_claim: str | None = Field(default="tier", validation_alias="OIDC_TIER_CLAIM")
    """Login claim naming the caller's tier (selects the policy's per-tier rules)."""
    app_claim: str | None = Field(default="app", validation_alias="OIDC_APP_CLAIM")
    """Login claim naming the app (else the request's origin)."""
    oidc_issuer: str | None = Field(default=None, validation_alias="OIDC_ISSUER")
    """The identity provider's issuer URL (`iss` must equal it); https in production."""
    oidc_audience: CommaList = Field(default_factory=list, validation_alias="OIDC_AUDIENCE")
    """Accepted `aud` values of the app's login."""
    oidc_jwks_url: str | None = Field(default=None, validation_alias="OIDC_JWKS_URL")
    """Where the issuer's keys are (default: `jwks_uri` of its discovery document)."""
    oidc_algorithms: CommaList = Field(
        default_factory=lambda: list(DEFAULTASYMMETRIC_ALGORITHMS),
        validation_alias="OIDC_ALGORITHMS",
    )
    """Accepted signature algorithms; `none` and HS* are refused."""
    oidc_leeway_s: float = Field(default=30.0, ge=0, le=300, validation_alias="OIDC_LEEWAY_S")
    """Clock skew allowed on `exp`, `nbf` and `iat`."""
    oidc_jwks_timeout_s: float = Field(
        default=2.0, gt=0, le=30, validation_alias="OIDC_JWKS_TIMEOUT_S"
    )
    """Longest a request waits for a JWKS fetch."""
    oidc_jwks_min_refresh_s: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="OIDC_JWKS_MIN_REFRESH_S"
    )
    """At most one JWKS refresh (for an unknown `kid`) this often."""
    oidc_jwks_cache_s: float = Field(
        default=300.0, gt=0, le=86_400, validation_alias="OIDC_JWKS_CACHE_S"
    )
    """Seconds fetched keys are used before a routine refresh."""
    oidc_jwks_max_stale_s: float = Field(
        default=86_400.0, gt=0, le=30 * 86_400, validation_alias="OIDC_JWKS_MAX_STALE_S"
    )
    """Longest cached keys keep working while the issuer is unreachable."""
    assertion_key: SecretStr | None = Field(default=None, validation_alias="KEYVEIL_ASSERTION_KEY")
    """HMAC key the app's backend signs assertions with (assertion mode, HS256)."""
    assertion_public_key: str | None = Field(
        default=None, validation_alias="KEYVEIL_ASSERTION_PUBLIC_KEY"
    )
    """Ed25519 public key (PEM or base64url) of the app's backend (assertion mode, EdDSA)."""
    assertion_issuer: str | None = Field(default=None, validation_alias="KEYVEIL_ASSERTION_ISSUER")
    """Required `iss` of an assertion."""
    assertion_audience: str = Field(
        default="keyveil-token", validation_alias="KEYVEIL_ASSERTION_AUDIENCE"
    )
    """Required `aud` of an assertion."""
    assertion_max_lifetime_s: int = Field(
        default=300, ge=10, le=3600, validation_alias="KEYVEIL_ASSERTION_MAX_LIFETIME_S"
    )
    """Longest lifetime (`exp - iat`) an assertion may claim."""

    _split = field_validator(
        "proxy_scopes",
        "realtime_models",
        "realtime_voices",
        "oidc_audience",
        "oidc_algorithms",
        mode="before",
    )(split_commas)

    @field_validator("oidc_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        if not value or any(alg not in ASYMMETRIC_ALGORITHMS for alg in value):
            raise ValueError(
                "must be a comma list of asymmetric algorithms "
                f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))}); none and HS* are refused"
            )
        return value

    @model_validator(mode="after")
    def _identity_rules(self) -> Self:
        problems: list[tuple[str, str]] = []
        if self.principal_key is not None:
            rule = check_secret_strength(self.principal_key.get_secret_value())
            if rule:
                problems.append(("KEYVEIL_PRINCIPAL_KEY", rule))
        if self.auth_mode == "anonymous" and self.is_production and not self.allow_anonymous:
            problems.append(
                (
                    "KEYVEIL_AUTH_MODE",
                    "anonymous issuance is refused in production; use oidc or assertion, "
                    "or set KEYVEIL_ALLOW_ANONYMOUS=true",
                )
            )
        if self.auth_mode == "oidc":
            problems += self._oidc_problems()
        if self.auth_mode == "assertion":
            problems += self._assertion_problems()
        if problems:
            raise ConfigError(problems)
        return self

    def _oidc_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        scheme = "https://" if self.is_production else ("https://", "http://")
        if not self.oidc_issuer or not self.oidc_issuer.startswith(scheme):
            problems.append(
                ("OIDC_ISSUER", "required with KEYVEIL_AUTH_MODE=oidc (https in production)")
            )
        if not self.oidc_audience:
            problems.append(("OIDC_AUDIENCE", "required with KEYVEIL_AUTH_MODE=oidc"))
        if self.oidc_jwks_url is not None and not self.oidc_jwks_url.startswith(scheme):
            problems.append(
                ("OIDC_JWKS_URL", "must be an https URL (http only outside production)")
            )
        return problems

    def _assertion_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if (self.assertion_key is None) == (self.assertion_public_key is None):
            problems.append(
                (
                    "KEYVEIL_ASSERTION_KEY",
                    "set exactly one of KEYVEIL_ASSERTION_KEY (HS256) or "
                    "KEYVEIL_ASSERTION_PUBLIC_KEY (Ed25519) with KEYVEIL_AUTH_MODE=assertion",
                )
            )
        if self.assertion_key is not None:
            rule = check_secret_strength(self.assertion_key.get_secret_value())
            if rule:
                problems.append(("KEYVEIL_ASSERTION_KEY", rule))
        if self.assertion_public_key is not None:
            try:
                parse_ed25519_public_key(self.assertion_public_key)
            except ValueError:
                problems.append(
                    (
                        "KEYVEIL_ASSERTION_PUBLIC_KEY",
                        "must be an Ed25519 public key (PEM or base64url of the 32 raw bytes)",
                    )
                )
        if not self.assertion_issuer:
            problems.append(
                ("KEYVEIL_ASSERTION_ISSUER", "required with KEYVEIL_AUTH_MODE=assertion")
            )
        return problems

    def principal_hasher(self) -> PrincipalHasher:
        key = self.principal_key.get_secret_value() if self.principal_key else None
        return PrincipalHasher.from_secrets(
            principal_key=key, signing_key=self.proxy_signing_key.get_secret_value()
        )

    def secret_values(self) -> list[str]:
        extra = [s.get_secret_value() for s in (self.principal_key, self.assertion_key) if s]
        return [*super().secret_values(), *extra]

    @field_validator("proxy_scopes")
    @classmethod
    def _known_scopes(cls, value: list[str]) -> list[str]:
        known = {s.value for s in Scope}
        if not value or any(v not in known for v in value):
            raise ValueError(f"must be a comma list of {', '.join(sorted(known))}")
        return value

    @field_validator("realtime_models", "realtime_voices")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one allowed value")
        return value

    @model_validator(mode="after")
    def _public_url_in_production(self) -> Self:
        if self.is_production and (rule := public_url_problem(self.proxy_public_url)):
            raise ConfigError([("PROXY_PUBLIC_URL", rule)])
        return self
