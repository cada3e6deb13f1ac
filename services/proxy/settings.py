"""Proxy settings: the names come from docs/contracts.md; secrets have no defaults."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.settings import CommaList, CommonSettings, check_secret_strength, split_commas

__all__ = ["Settings"]

MIB = 1024 * 1024


class Settings(CommonSettings):
    """Environment of `python -m services.proxy`."""

    port: int = Field(default=8081, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10, validation_alias="REDIS_TIMEOUT_S")

    proxy_signing_key: SecretStr = Field(validation_alias="PROXY_SIGNING_KEY")
    proxy_signing_key_previous: SecretStr | None = Field(
        default=None, validation_alias="PROXY_SIGNING_KEY_PREVIOUS"
    )

    rate_limit_per_min: int = Field(
        default=120, ge=1, le=1_000_000, validation_alias="VOICE_AGENT_PROXY_RATE_LIMIT"
    )
    ip_rate_limit_per_min: int = Field(
        default=600, ge=1, le=10_000_000, validation_alias="VOICE_AGENT_PROXY_IP_RATE_LIMIT"
    )
    allowed_origins: CommaList = Field(default_factory=list, validation_alias="ALLOWED_ORIGINS")
    trusted_proxies: CommaList = Field(default_factory=list, validation_alias="TRUSTED_PROXIES")
    demo_mode: bool = Field(default=False, validation_alias="VOICE_AGENT_DEMO_MODE")
    openai_base_url: str = Field(
        default="https://api.openai.com/v1", validation_alias="OPENAI_BASE_URL"
    )
    key_environment: str | None = Field(default=None, validation_alias="KEY_ENVIRONMENT")

    signature_window_s: float = Field(
        default=60.0, gt=0, le=600, validation_alias="SIGNATURE_WINDOW_S"
    )
    max_json_body_bytes: int = Field(
        default=4 * MIB, ge=1024, le=64 * MIB, validation_alias="PROXY_MAX_JSON_BYTES"
    )
    # OpenAI's 25 MB file limit, plus room for the multipart framing and the model field.
    max_upload_bytes: int = Field(
        default=25 * MIB + 64 * 1024,
        ge=1024,
        le=256 * MIB,
        validation_alias="PROXY_MAX_UPLOAD_BYTES",
    )

    upstream_connect_timeout_s: float = Field(
        default=5.0, gt=0, le=60, validation_alias="UPSTREAM_CONNECT_TIMEOUT_S"
    )
    upstream_read_timeout_s: float = Field(
        default=120.0, gt=0, le=900, validation_alias="UPSTREAM_READ_TIMEOUT_S"
    )
    upstream_max_connections: int = Field(
        default=200, ge=1, le=10_000, validation_alias="UPSTREAM_MAX_CONNECTIONS"
    )
    token_cache_size: int = Field(default=10_000, ge=1, validation_alias="PROXY_TOKEN_CACHE_SIZE")

    cache_ttl_s: int = Field(
        default=3600, ge=1, le=7 * 86_400, validation_alias="PROXY_CACHE_TTL_S"
    )
    cache_max_entry_bytes: int = Field(
        default=2 * MIB, ge=0, le=32 * MIB, validation_alias="PROXY_CACHE_MAX_ENTRY_BYTES"
    )

    @field_validator("allowed_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_commas(value)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ValueError("each origin must be a full http(s) origin; '*' is refused")
        return [origin.rstrip("/") for origin in value]

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("proxy_signing_key")
    @classmethod
    def _strong(cls, value: SecretStr) -> SecretStr:
        problem = check_secret_strength(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if not self.is_production:
            return self
        if self.demo_mode:
            raise ValueError("VOICE_AGENT_DEMO_MODE is refused in production")
        if not self.openai_base_url.startswith("https://"):
            raise ValueError("OPENAI_BASE_URL must be https in production")
        if any(origin.startswith("http://") for origin in self.allowed_origins):
            raise ValueError("ALLOWED_ORIGINS must be https origins in production")
        return self

    @property
    def lease_environment(self) -> str:
        return self.key_environment or self.node_env.value

    def secret_values(self) -> list[str]:
        """Every secret value, for the log redactor."""
        values = [self.proxy_signing_key.get_secret_value()]
        if self.proxy_signing_key_previous is not None:
            values.append(self.proxy_signing_key_previous.get_secret_value())
        if self.nats_password is not None:
            values.append(self.nats_password.get_secret_value())
        return values
