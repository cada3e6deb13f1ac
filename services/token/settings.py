"""Token service settings: names from docs/contracts.md, rules that refuse a bad setup."""

from __future__ import annotations

from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.errors import ConfigError
from shared.ratelimit import FailureMode
from shared.settings import CommaList, CommonSettings, check_secret_strength, split_commas
from shared.tokens import Scope

__all__ = ["Settings"]

DEFAULT_REALTIME_MODELS = ["gpt-realtime", "gpt-realtime-mini"]
DEFAULT_REALTIME_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse"]


class Settings(CommonSettings):
    """Environment of `python -m services.token`."""

    port: int = Field(default=8080, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10, validation_alias="REDIS_TIMEOUT_S")

    proxy_signing_key: SecretStr = Field(validation_alias="PROXY_SIGNING_KEY")
    proxy_signing_key_previous: SecretStr | None = Field(
        default=None, validation_alias="PROXY_SIGNING_KEY_PREVIOUS"
    )

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
    demo_mode: bool = Field(default=False, validation_alias="VOICE_AGENT_DEMO_MODE")
    openai_base_url: str = Field(
        default="https://api.openai.com/v1", validation_alias="OPENAI_BASE_URL"
    )
    upstream_timeout_s: float = Field(
        default=5.0, gt=0, le=60, validation_alias="TOKEN_UPSTREAM_TIMEOUT_S"
    )
    trusted_proxies: CommaList = Field(default_factory=list, validation_alias="TRUSTED_PROXIES")
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
    signature_window_s: float = Field(
        default=60.0, gt=0, le=600, validation_alias="SIGNATURE_WINDOW_S"
    )  # the same variable and default as the proxy's: one freshness rule for clients
    legacy_deprecated_at: int = Field(
        default=1_767_225_600, ge=0, validation_alias="LEGACY_TOKEN_DEPRECATED_AT"
    )
    legacy_sunset_at: int = Field(
        default=1_798_761_600, ge=0, validation_alias="LEGACY_TOKEN_SUNSET_AT"
    )

    _split = field_validator(
        "allowed_origins",
        "trusted_proxies",
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

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError("each origin must be scheme://host[:port] with no path")
        return [o.rstrip("/").lower() for o in value]

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems: list[tuple[str, str]] = []
        for name, secret in (
            ("PROXY_SIGNING_KEY", self.proxy_signing_key),
            ("PROXY_SIGNING_KEY_PREVIOUS", self.proxy_signing_key_previous),
        ):
            if secret is not None:
                for part in secret.get_secret_value().split(","):
                    if rule := check_secret_strength(part.strip()):
                        problems.append((name, rule))
        if self.is_production:
            if self.demo_mode:
                problems.append(("VOICE_AGENT_DEMO_MODE", "must be false in production"))
            if not self.allowed_origins or any(
                not o.startswith("https://") for o in self.allowed_origins
            ):
                problems.append(
                    ("ALLOWED_ORIGINS", "must list only https origins (no *) in production")
                )
            if not self.openai_base_url.startswith("https://"):
                problems.append(("OPENAI_BASE_URL", "must be https in production"))
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def previous_signing_keys(self) -> list[str]:
        if self.proxy_signing_key_previous is None:
            return []
        raw = self.proxy_signing_key_previous.get_secret_value()
        return [part.strip() for part in raw.split(",") if part.strip()]

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor."""
        values: list[Any] = [self.proxy_signing_key.get_secret_value(), *self.previous_signing_keys]
        if self.nats_password is not None:
            values.append(self.nats_password.get_secret_value())
        return [str(v) for v in values]
