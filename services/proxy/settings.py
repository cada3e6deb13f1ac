"""Proxy settings: the names come from docs/contracts.md; secrets have no defaults."""

from __future__ import annotations

from pydantic import Field

from shared.settings import EdgeSettings

__all__ = ["Settings"]

MIB = 1024 * 1024


class Settings(EdgeSettings):
    """Environment of `python -m services.proxy`."""

    port: int = Field(default=8081, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    rate_limit_per_min: int = Field(
        default=120, ge=1, le=1_000_000, validation_alias="VOICE_AGENT_PROXY_RATE_LIMIT"
    )
    ip_rate_limit_per_min: int = Field(
        default=600, ge=1, le=10_000_000, validation_alias="VOICE_AGENT_PROXY_IP_RATE_LIMIT"
    )
    user_rate_limit_per_min: int = Field(
        default=300, ge=1, le=1_000_000, validation_alias="VOICE_AGENT_USER_RATE_LIMIT"
    )
    key_environment: str | None = Field(default=None, validation_alias="KEY_ENVIRONMENT")

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

    @property
    def lease_environment(self) -> str:
        return self.key_environment or self.node_env.value
