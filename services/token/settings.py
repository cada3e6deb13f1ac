"""Token service settings: names from docs/contracts.md, rules that refuse a bad setup."""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.ratelimit import FailureMode
from shared.settings import CommaList, EdgeSettings, split_commas
from shared.tokens import Scope

__all__ = ["Settings"]

DEFAULT_REALTIME_MODELS = ["gpt-realtime", "gpt-realtime-mini"]
DEFAULT_REALTIME_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse"]


class Settings(EdgeSettings):
    """Environment of `python -m services.token`."""

    port: int = Field(default=8080, ge=0, le=65535, validation_alias="KEYVEIL_PORT")

    rate_limit_per_minute: int = Field(
        default=10, ge=1, le=100_000, validation_alias="VOICE_AGENT_RATE_LIMIT"
    )
    rate_limit_failure_mode: FailureMode = Field(
        default=FailureMode.closed, validation_alias="TOKEN_RATE_LIMIT_FAILURE_MODE"
    )
    block_after_strikes: int = Field(
        default=20, ge=1, validation_alias="RATE_LIMIT_BLOCK_AFTER_STRIKES"
    )
    strike_window_s: float = Field(
        default=60.0, gt=0, validation_alias="RATE_LIMIT_STRIKE_WINDOW_S"
    )
    block_for_s: float = Field(default=300.0, gt=0, validation_alias="RATE_LIMIT_BLOCK_FOR_S")

    token_duration_s: int = Field(
        default=300, ge=10, le=7200, validation_alias="VOICE_AGENT_TOKEN_DURATION"
    )
    allowed_origins: CommaList = Field(
        default_factory=lambda: ["http://localhost:3000", "http://127.0.0.1:3000"],
        validation_alias="ALLOWED_ORIGINS",
    )
    upstream_timeout_s: float = Field(
        default=5.0, gt=0, le=60, validation_alias="TOKEN_UPSTREAM_TIMEOUT_S"
    )
    proxy_public_url: str = Field(
        default="http://127.0.0.1:8081/api/voice-agent/proxy/v1",
        validation_alias="PROXY_PUBLIC_URL",
    )
    proxy_scopes: CommaList = Field(
        default_factory=lambda: [s.value for s in Scope], validation_alias="PROXY_SCOPES"
    )
    realtime_models: CommaList = Field(
        default_factory=lambda: list(DEFAULT_REALTIME_MODELS), validation_alias="REALTIME_MODELS"
    )
    realtime_voices: CommaList = Field(
        default_factory=lambda: list(DEFAULT_REALTIME_VOICES), validation_alias="REALTIME_VOICES"
    )
    max_body_bytes: int = Field(
        default=16_384, ge=256, le=1_048_576, validation_alias="TOKEN_MAX_BODY_BYTES"
    )
    legacy_deprecated_at: int = Field(
        default=1_767_225_600, ge=0, validation_alias="LEGACY_TOKEN_DEPRECATED_AT"
    )
    legacy_sunset_at: int = Field(
        default=1_798_761_600, ge=0, validation_alias="LEGACY_TOKEN_SUNSET_AT"
    )

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
