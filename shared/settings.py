"""Settings shared by every service, and the rules that refuse a bad configuration.

Settings are built once in a service's `main()` (never at import) and passed in.
A violation raises `ConfigError` naming the variable and the rule, never the value.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import sys
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
    "normalise_environment",
    "parse_environment",
    "public_url_problem",
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


_ENVIRONMENT_ALIASES = {"dev": "development", "prod": "production", "test": "development"}


def normalise_environment(value: str) -> str:
    """NODE_ENV as the settings read it ("prod" -> "production"); unknown values pass through."""
    cleaned = value.strip().lower()
    return _ENVIRONMENT_ALIASES.get(cleaned, cleaned)


def parse_environment(value: str) -> Environment | None:
    """The Environment a NODE_ENV value names, or None when it names none ("prodution")."""
    try:
        return Environment(normalise_environment(value))
    except ValueError:
        return None


def public_url_problem(url: str) -> str | None:
    """Why `url` cannot be what browsers are told in production, or None."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return "must be an https URL in production"
    host = parts.hostname.lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost" or host.endswith(".localhost")
    if loopback:
        return "must not be a loopback address in production (browsers cannot reach it)"
    return None


class CommonSettings(BaseSettings):
    """What every service reads: where it listens, the bus, the environment."""

    # Field docstrings become descriptions: docs/configuration.md is generated from them.
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, frozen=True, use_attribute_docstrings=True
    )

    node_env: Environment = Field(
        default=Environment.development,
        validation_alias=AliasChoices("NODE_ENV", "APP_ENV"),
    )
    """Deployment environment: development, staging or production (dev/prod/test accepted).
    Production turns on the strict rules."""
    host: str = Field(default="127.0.0.1", validation_alias="KEYVEIL_HOST")
    """Address the service listens on (0.0.0.0 in containers)."""
    port: int = Field(default=8080, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    """TCP port the service listens on (HTTP: API, /healthz, /readyz, /metrics)."""
    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias="NATS_URL")
    """NATS server(s), comma-separated; tls:// for an encrypted bus."""
    nats_user: str | None = Field(default=None, validation_alias="NATS_USER")
    """This service's NATS user (deploy/nats/auth.conf grants each its own subjects)."""
    nats_password: SecretStr | None = Field(default=None, validation_alias="NATS_PASSWORD")
    """Password of NATS_USER."""
    nats_request_timeout_s: float = Field(
        default=2.0, gt=0, le=30, validation_alias="NATS_REQUEST_TIMEOUT_S"
    )
    """Seconds a NATS request (e.g. a key lease) waits for its reply."""
    jetstream_replicas: int = Field(default=1, ge=1, le=5, validation_alias="JETSTREAM_REPLICAS")
    """Replicas of every event stream; all services must agree, or streams flip-flop."""
    log_level: str = Field(
        default="INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$",
        validation_alias="LOG_LEVEL",
    )
    """Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."""
    log_format: str = Field(default="json", pattern="^(json|text)$", validation_alias="LOG_FORMAT")
    """Log line format: json (one object a line) or text."""

    @field_validator("node_env", mode="before")
    @classmethod
    def _normalise_env(cls, value: Any) -> Any:
        return normalise_environment(value) if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

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
    """Redis for rate limits, nonces, revocations and the response cache (rediss:// for TLS;
    user:password@ for auth)."""
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10, validation_alias="REDIS_TIMEOUT_S")
    """Seconds a Redis call may take before the limiter's failure mode applies."""
    proxy_signing_key: SecretStr = Field(validation_alias="PROXY_SIGNING_KEY")
    """Signs proxy tokens and derives each token's request-signing key; 32+ characters, high
    entropy. Shared by token and proxy."""
    proxy_signing_key_previous: SecretStr | None = Field(
        default=None, validation_alias="PROXY_SIGNING_KEY_PREVIOUS"
    )
    """Comma-separated former PROXY_SIGNING_KEY values still accepted for verification during a
    rotation."""
    allowed_origins: CommaList = Field(default_factory=list, validation_alias="ALLOWED_ORIGINS")
    """Comma-separated browser origins (scheme://host[:port]) allowed to get tokens and call
    the proxy; https only in production, never '*'."""
    trusted_proxies: CommaList = Field(default_factory=list, validation_alias="TRUSTED_PROXIES")
    """Comma-separated IPs/CIDRs of ingress proxies whose X-Forwarded-For is believed (counted
    from the right)."""
    # IP blocking after repeated auth failures: one rule for both edges (they share
    # the Redis strike counter, so differing thresholds would make no sense).
    block_after_strikes: int = Field(
        default=20, ge=1, validation_alias="RATE_LIMIT_BLOCK_AFTER_STRIKES"
    )
    """Auth failures or limit hits within RATE_LIMIT_STRIKE_WINDOW_S that block a client IP
    at both edges (`keyveil blocks` lists and lifts blocks)."""
    strike_window_s: float = Field(
        default=60.0, gt=0, validation_alias="RATE_LIMIT_STRIKE_WINDOW_S"
    )
    """Seconds over which strikes are counted."""
    block_for_s: float = Field(default=300.0, gt=0, validation_alias="RATE_LIMIT_BLOCK_FOR_S")
    """Seconds a blocked client IP stays blocked."""
    country_header: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9-]{1,64}$", validation_alias="COUNTRY_HEADER"
    )
    """Ingress header with the client's ISO country code (e.g. X-Country set from
    CF-IPCountry), believed only from a TRUSTED_PROXIES peer; the proxy puts it on its usage
    events for the auditor's geography detectors."""
    key_environment: str | None = Field(default=None, validation_alias="KEY_ENVIRONMENT")
    """Environment whose provider key the token service and the proxy lease (default:
    NODE_ENV)."""
    demo_mode: bool = Field(default=False, validation_alias="VOICE_AGENT_DEMO_MODE")
    """Canned answers, never an upstream call; refused in production."""
    openai_base_url: str = Field(
        default="https://api.openai.com/v1", validation_alias="OPENAI_BASE_URL"
    )
    """Upstream OpenAI-compatible API base URL; https in production."""
    signature_window_s: float = Field(
        default=60.0, gt=0, le=600, validation_alias="SIGNATURE_WINDOW_S"
    )
    """Seconds a request signature's `created` may differ from now, both ways; nonces are
    remembered this long."""

    policy_file: Path | None = Field(default=None, validation_alias="KEYVEIL_POLICY_FILE")
    """The usage policy (shared/policy.py), the same file for the token service and the proxy."""
    # HTTP bounds enforced by the protocol (shared.httpprotocol), before the app runs.
    max_header_count: int = Field(
        default=100, ge=16, le=10_000, validation_alias="HTTP_MAX_HEADER_COUNT"
    )
    """Header fields a request may carry; more is refused with 431 before the app runs."""
    max_header_bytes: int = Field(
        default=32 * 1024, ge=4096, le=1024 * 1024, validation_alias="HTTP_MAX_HEADER_BYTES"
    )
    """Total bytes of a request's header fields; more is refused with 431."""
    max_url_bytes: int = Field(
        default=8 * 1024, ge=1024, le=1024 * 1024, validation_alias="HTTP_MAX_URL_BYTES"
    )
    """Longest request target (path and query); longer is refused with 414."""
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300, validation_alias="HTTP_HEADER_TIMEOUT_S"
    )
    """Seconds a request head may take to arrive in full (slow-header clients get 408)."""
    write_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, validation_alias="HTTP_WRITE_TIMEOUT_S"
    )
    """Seconds an answer may wait for a client that stops reading before it is cut off."""
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

    @property
    def lease_environment(self) -> str:
        """KEY_ENVIRONMENT, or NODE_ENV when it is not set."""
        return self.key_environment or self.node_env.value

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


def settings_or_exit(model: type[S], **overrides: Any) -> S:
    """Build settings or exit with status 2 and a message naming each bad variable."""
    try:
        return load_settings(model, **overrides)
    except ConfigError as exc:
        print(f"keyveil: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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
