"""Settings shared by every service, and the rules that refuse a bad configuration.

Settings are built once in a service's `main()` (never at import) and passed in.
A violation raises `ConfigError` naming the variable and the rule, never the value.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError
from shared.tokens import TokenKeyring

__all__ = [
    "CommaList",
    "CommonSettings",
    "EdgeSettings",
    "Environment",
    "check_secret_strength",
    "env_name",
    "load_settings",
    "split_commas",
]

MIN_SECRET_LENGTH = 32
MIN_SECRET_ENTROPY_BITS = 128.0
_PLACEHOLDERS = ("changeme", "change-me", "change_me", "your-", "example", "placeholder", "xxxx")

S = TypeVar("S", bound=BaseSettings)


class Environment(StrEnum):
    development = "development"
    staging = "staging"
    production = "production"


def split_commas(value: Any) -> Any:
    """Field validator body for `CommaList` fields: "a, b" -> ["a", "b"]."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]
"""A list read from a comma-separated environment variable."""


def secret_entropy_bits(value: str) -> float:
    """Shannon entropy of the string's characters times its length (an upper bound)."""
    counts = Counter(value)
    per_char = -sum((n / len(value)) * math.log2(n / len(value)) for n in counts.values())
    return per_char * len(value)


def check_secret_strength(value: str) -> str | None:
    """The rule a secret breaks, or None when it is long, varied and not a placeholder."""
    if len(value) < MIN_SECRET_LENGTH:
        return f"must be at least {MIN_SECRET_LENGTH} characters"
    lowered = value.lower()
    if any(marker in lowered for marker in _PLACEHOLDERS):
        return "looks like a placeholder"
    if len(set(value)) < 12 or secret_entropy_bits(value) < MIN_SECRET_ENTROPY_BITS:
        return "has too little entropy (use `keyveil env template` or secrets.token_urlsafe(32))"
    if _sequential_share(value) > 0.25:
        return "is a predictable sequence (use `keyveil env template` or secrets.token_urlsafe(32))"
    return None


def _sequential_share(value: str) -> float:
    """Share of neighbouring characters that repeat or step by one ("abcd", "9876", "aaaa").

    Character counts alone rate `abcdefghijklmnopqrstuvwxyz012345` as high entropy; a
    random 32-character secret has about 3 such steps in 31, a keyboard walk nearly all.
    """
    steps = sum(1 for a, b in itertools.pairwise(value) if abs(ord(a) - ord(b)) <= 1)
    return steps / max(len(value) - 1, 1)


class CommonSettings(BaseSettings):
    """What every service reads: where it listens, the bus, the environment."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    node_env: Environment = Field(
        default=Environment.development,
        validation_alias=AliasChoices("NODE_ENV", "APP_ENV"),
    )
    host: str = Field(default="127.0.0.1", validation_alias="KEYVEIL_HOST")
    port: int = Field(default=8080, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias="NATS_URL")
    nats_user: str | None = Field(default=None, validation_alias="NATS_USER")
    nats_password: SecretStr | None = Field(default=None, validation_alias="NATS_PASSWORD")
    nats_request_timeout_s: float = Field(
        default=2.0, gt=0, le=30, validation_alias="NATS_REQUEST_TIMEOUT_S"
    )
    jetstream_replicas: int = Field(default=1, ge=1, le=5, validation_alias="JETSTREAM_REPLICAS")
    """Replicas of every event stream; all services must agree, or streams flip-flop."""
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")
    log_format: str = Field(default="json", pattern="^(json|text)$", validation_alias="LOG_FORMAT")

    @field_validator("node_env", mode="before")
    @classmethod
    def _normalise_env(cls, value: Any) -> Any:
        aliases = {"dev": "development", "prod": "production", "test": "development"}
        if isinstance(value, str):
            return aliases.get(value.strip().lower(), value.strip().lower())
        return value

    @property
    def is_production(self) -> bool:
        return self.node_env is Environment.production

    def secret_values(self) -> list[str]:
        """Every secret value this service holds, for the log redactor to mask."""
        return [self.nats_password.get_secret_value()] if self.nats_password else []


class EdgeSettings(CommonSettings):
    """What the two HTTP edges (token and proxy) share, and the rules they share.

    One definition keeps the two from drifting: the same origins rule, the same
    signing-key rotation (PROXY_SIGNING_KEY_PREVIOUS, comma-separated), the same
    freshness window for request signatures, the same production rules.
    """

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10, validation_alias="REDIS_TIMEOUT_S")
    proxy_signing_key: SecretStr = Field(validation_alias="PROXY_SIGNING_KEY")
    proxy_signing_key_previous: SecretStr | None = Field(
        default=None, validation_alias="PROXY_SIGNING_KEY_PREVIOUS"
    )
    allowed_origins: CommaList = Field(default_factory=list, validation_alias="ALLOWED_ORIGINS")
    trusted_proxies: CommaList = Field(default_factory=list, validation_alias="TRUSTED_PROXIES")
    demo_mode: bool = Field(default=False, validation_alias="VOICE_AGENT_DEMO_MODE")
    openai_base_url: str = Field(
        default="https://api.openai.com/v1", validation_alias="OPENAI_BASE_URL"
    )
    signature_window_s: float = Field(
        default=60.0, gt=0, le=600, validation_alias="SIGNATURE_WINDOW_S"
    )
    policy_file: Path | None = Field(default=None, validation_alias="KEYVEIL_POLICY_FILE")
    """The usage policy (shared/policy.py), the same file for the token service and the proxy."""
    # HTTP bounds enforced by the protocol (shared.httpprotocol), before the app runs.
    max_header_count: int = Field(
        default=100, ge=16, le=10_000, validation_alias="HTTP_MAX_HEADER_COUNT"
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=4096, le=1024 * 1024, validation_alias="HTTP_MAX_HEADER_BYTES"
    )
    max_url_bytes: int = Field(
        default=8 * 1024, ge=1024, le=1024 * 1024, validation_alias="HTTP_MAX_URL_BYTES"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300, validation_alias="HTTP_HEADER_TIMEOUT_S"
    )
    write_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, validation_alias="HTTP_WRITE_TIMEOUT_S"
    )
    body_timeout_s: float = Field(
        default=10.0, gt=0, le=600, validation_alias="HTTP_BODY_TIMEOUT_S"
    )
    """A small request body (the token service's) must be all there this long after the head."""

    _split_edge = field_validator("allowed_origins", "trusted_proxies", mode="before")(split_commas)

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise ValueError("each origin must be scheme://host[:port]; '*' is refused")
        return [origin.rstrip("/").lower() for origin in value]

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError("each entry must be an IP address or CIDR") from None
        return value

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _edge_rules(self) -> Self:
        problems: list[tuple[str, str]] = []
        for name, keys in (
            ("PROXY_SIGNING_KEY", [self.proxy_signing_key.get_secret_value()]),
            ("PROXY_SIGNING_KEY_PREVIOUS", self.previous_signing_keys),
        ):
            problems += [(name, rule) for key in keys if (rule := check_secret_strength(key))]
        if self.is_production:
            if self.demo_mode:
                problems.append(("VOICE_AGENT_DEMO_MODE", "must be false in production"))
            if not self.allowed_origins or any(
                not o.startswith("https://") for o in self.allowed_origins
            ):
                problems.append(("ALLOWED_ORIGINS", "must list only https origins in production"))
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

    def keyring(self) -> TokenKeyring:
        """Signs with PROXY_SIGNING_KEY; still verifies tokens of the previous keys."""
        return TokenKeyring(self.proxy_signing_key.get_secret_value(), self.previous_signing_keys)

    def secret_values(self) -> list[str]:
        return [
            *super().secret_values(),
            self.proxy_signing_key.get_secret_value(),
            *self.previous_signing_keys,
        ]


def env_name(model: type[BaseSettings], field: str) -> str:
    """The environment variable a field is read from."""
    info = model.model_fields.get(field)
    if info is None:
        return field.upper()
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else field.upper()
    return field.upper()


def load_settings(model: type[S], **overrides: Any) -> S:
    """Build `model` from the environment, turning validation errors into a `ConfigError`.

    pydantic's own messages include the offending input; we keep only names and rules.
    """
    import os

    from shared.sealedconfig import open_environment  # `enc:v1:` values (keyveil env encrypt)

    try:
        return model(**{**open_environment(os.environ), **overrides})
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for error in exc.errors(include_input=False, include_url=False):
            field = str(error["loc"][0]) if error["loc"] else "?"
            rule = error["msg"].removeprefix("Value error, ")
            problems.append((env_name(model, field), rule))
        raise ConfigError(problems) from None
