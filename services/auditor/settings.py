"""Auditor settings: the bus, the ledger's keys and checkpoints, detector thresholds and
cooldowns, alert delivery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from services.auditor.ledgerkeys import LedgerKeyError, LedgerSigner, LedgerVerifier
from shared.settings import CommaList, CommonSettings, split_commas

__all__ = ["Settings"]


class Settings(CommonSettings):
    """Environment of `python -m services.auditor`; every threshold has a safe default."""

    port: int = Field(default=8083, ge=0, le=65535, validation_alias="KEYVEIL_PORT")

    # Consumers.
    ack_wait_s: float = Field(default=30.0, gt=0, le=3600, validation_alias="AUDITOR_ACK_WAIT_S")
    max_deliver: int = Field(default=10, ge=1, le=1000, validation_alias="AUDITOR_MAX_DELIVER")
    fetch_batch: int = Field(default=256, ge=1, le=4096, validation_alias="AUDITOR_FETCH_BATCH")
    dedupe_window: int = Field(
        default=200_000, ge=1000, le=10_000_000, validation_alias="AUDITOR_DEDUPE_WINDOW"
    )
    ledger_enabled: bool = Field(default=True, validation_alias="AUDITOR_LEDGER_ENABLED")

    # Ledger signing (Ed25519, base64url raw 32-byte seed): held by this process only.
    # Required in production; in development a missing one is generated per process
    # (its public key is logged and written next to the checkpoints, so verify works).
    ledger_signing_key: SecretStr | None = Field(
        default=None, validation_alias="LEDGER_SIGNING_KEY"
    )
    # Public keys of earlier signing keys, so records signed before a rotation verify.
    ledger_verify_keys: CommaList = Field(
        default_factory=list, validation_alias="LEDGER_VERIFY_KEY"
    )
    ledger_checkpoint_dir: Path | None = Field(
        default=None, validation_alias="LEDGER_CHECKPOINT_DIR"
    )
    ledger_checkpoint_interval_s: float = Field(
        default=300.0, gt=0, le=86_400, validation_alias="LEDGER_CHECKPOINT_INTERVAL_S"
    )
    ledger_checkpoint_keep: int = Field(
        default=48, ge=1, le=10_000, validation_alias="LEDGER_CHECKPOINT_KEEP"
    )

    # Auth-failure burst per IP.
    auth_failure_threshold: int = Field(
        default=20, ge=1, validation_alias="AUDITOR_AUTH_FAILURE_THRESHOLD"
    )
    auth_failure_window_s: float = Field(
        default=60.0, gt=0, validation_alias="AUDITOR_AUTH_FAILURE_WINDOW_S"
    )

    # Token generation: per IP (floor and multiple of the learned per-IP typical rate)
    # and overall (EWMA baseline with a z-score trigger).
    token_ip_threshold: int = Field(default=30, ge=1, validation_alias="AUDITOR_TOKEN_IP_THRESHOLD")
    token_window_s: float = Field(default=60.0, gt=0, validation_alias="AUDITOR_TOKEN_WINDOW_S")
    token_rate_min_count: int = Field(
        default=50, ge=1, validation_alias="AUDITOR_TOKEN_RATE_MIN_COUNT"
    )
    # Per user (the hashed principal): an issuance burst, and one login used from many IPs.
    token_user_threshold: int = Field(
        default=20, ge=1, validation_alias="AUDITOR_TOKEN_USER_THRESHOLD"
    )
    user_ip_threshold: int = Field(default=5, ge=2, validation_alias="AUDITOR_USER_IP_THRESHOLD")
    user_ip_window_s: float = Field(
        default=600.0, gt=0, validation_alias="AUDITOR_USER_IP_WINDOW_S"
    )

    # Proxy error rate.
    proxy_error_ratio: float = Field(
        default=0.25, gt=0, le=1, validation_alias="AUDITOR_PROXY_ERROR_RATIO"
    )
    proxy_error_min_requests: int = Field(
        default=20, ge=1, validation_alias="AUDITOR_PROXY_ERROR_MIN_REQUESTS"
    )
    proxy_error_window_s: float = Field(
        default=60.0, gt=0, validation_alias="AUDITOR_PROXY_ERROR_WINDOW_S"
    )

    # Usage spikes (per key, per token subject) and the overall token rate baseline.
    baseline_bucket_s: float = Field(
        default=60.0, gt=0, validation_alias="AUDITOR_BASELINE_BUCKET_S"
    )
    baseline_alpha: float = Field(
        default=0.1, gt=0, lt=1, validation_alias="AUDITOR_BASELINE_ALPHA"
    )
    baseline_warmup_buckets: int = Field(
        default=10, ge=1, validation_alias="AUDITOR_BASELINE_WARMUP_BUCKETS"
    )
    spike_z: float = Field(default=6.0, gt=0, validation_alias="AUDITOR_SPIKE_Z")
    spike_min_count: int = Field(default=60, ge=1, validation_alias="AUDITOR_SPIKE_MIN_COUNT")
    max_tracked: int = Field(default=50_000, ge=100, validation_alias="AUDITOR_MAX_TRACKED")

    # Replay and tampering (per token, else per IP).
    replay_threshold: int = Field(default=3, ge=1, validation_alias="AUDITOR_REPLAY_THRESHOLD")
    tamper_threshold: int = Field(default=3, ge=1, validation_alias="AUDITOR_TAMPER_THRESHOLD")
    replay_window_s: float = Field(default=300.0, gt=0, validation_alias="AUDITOR_REPLAY_WINDOW_S")

    # Geography.
    geo_token_window_s: float = Field(
        default=3600.0, gt=0, validation_alias="AUDITOR_GEO_TOKEN_WINDOW_S"
    )
    geo_key_warmup_events: int = Field(
        default=50, ge=1, validation_alias="AUDITOR_GEO_KEY_WARMUP_EVENTS"
    )

    # One incident, one alert: the same (type, subject) stays quiet this long.
    alert_cooldown_s: float = Field(
        default=600.0, ge=0, validation_alias="AUDITOR_ALERT_COOLDOWN_S"
    )
    rotation_cooldown_s: float = Field(
        default=86_400.0, ge=0, validation_alias="AUDITOR_ROTATION_COOLDOWN_S"
    )

    # Webhook delivery (Slack incoming webhook or Alertmanager /api/v2/alerts).
    alert_webhook_url: SecretStr | None = Field(default=None, validation_alias="ALERT_WEBHOOK_URL")
    alert_webhook_format: str = Field(
        default="slack", pattern="^(slack|alertmanager)$", validation_alias="ALERT_WEBHOOK_FORMAT"
    )
    alert_webhook_attempts: int = Field(
        default=5, ge=1, le=20, validation_alias="ALERT_WEBHOOK_ATTEMPTS"
    )
    alert_webhook_backoff_s: float = Field(
        default=0.5, gt=0, le=60, validation_alias="ALERT_WEBHOOK_BACKOFF_S"
    )
    alert_webhook_min_severity: str = Field(
        default="warning",
        pattern="^(info|warning|critical)$",
        validation_alias="ALERT_WEBHOOK_MIN_SEVERITY",
    )

    @field_validator("ledger_verify_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return split_commas(value)

    @field_validator("ledger_checkpoint_dir", mode="before")
    @classmethod
    def _empty_dir_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("ledger_signing_key")
    @classmethod
    def _seed_is_a_seed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        try:
            LedgerSigner.from_seed(value.get_secret_value())
        except (LedgerKeyError, ValueError):
            raise ValueError("must be a base64url Ed25519 seed of 32 bytes") from None
        return value

    @field_validator("ledger_verify_keys")
    @classmethod
    def _keys_are_keys(cls, value: list[str]) -> list[str]:
        try:
            LedgerVerifier.from_strings(value)
        except (LedgerKeyError, ValueError):
            raise ValueError("must be base64url Ed25519 public keys of 32 bytes") from None
        return value

    def ledger_signer(self) -> LedgerSigner | None:
        """The configured signing key, or None (development: the caller generates one)."""
        if self.ledger_signing_key is None:
            return None
        return LedgerSigner.from_seed(self.ledger_signing_key.get_secret_value())

    def ledger_verifier(self) -> LedgerVerifier:
        return LedgerVerifier.from_strings(self.ledger_verify_keys)

    def secret_values(self) -> list[str]:
        values = super().secret_values()
        if self.ledger_signing_key is not None:
            values.append(self.ledger_signing_key.get_secret_value())
        if self.alert_webhook_url is not None:
            values.append(self.alert_webhook_url.get_secret_value())
        return values

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_is_http(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        url = self.alert_webhook_url.get_secret_value() if self.alert_webhook_url else ""
        if self.is_production and url.startswith("http://"):
            raise ValueError("ALERT_WEBHOOK_URL must use https in production")
        if self.is_production and self.ledger_enabled and self.ledger_signing_key is None:
            raise ValueError("LEDGER_SIGNING_KEY must be set in production")
        if self.is_production and self.ledger_enabled and self.ledger_checkpoint_dir is None:
            raise ValueError("LEDGER_CHECKPOINT_DIR must be set in production")
        return self
