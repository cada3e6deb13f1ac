"""Token service settings: names from docs/contracts.md, rules that refuse a bad setup."""

from __future__ import annotations

from typing import Self

from pydantic import Field, field_validator, model_validator

from shared.errors import ConfigError
from shared.ratelimit import FailureMode
from shared.settings import CommaList, EdgeSettings, public_url_problem, split_commas
from shared.tokens import Scope

__all__ = ["Settings"]

DEFAULT_REALTIME_MODELS = ["gpt-realtime", "gpt-realtime-mini"]
DEFAULT_REALTIME_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse"]


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

    _split = field_validator(
        "proxy_scopes",
        "realtime_models",
        "realtime_voices",
        mode="before",
    )(split_commas)

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
