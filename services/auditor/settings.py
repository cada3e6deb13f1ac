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
    """TCP port the service listens on (HTTP: API, /healthz, /readyz, /metrics)."""

    # Consumers.
    ack_wait_s: float = Field(default=30.0, gt=0, le=3600, validation_alias="AUDITOR_ACK_WAIT_S")
    """Seconds before an unacknowledged event is redelivered."""
    max_deliver: int = Field(default=10, ge=1, le=1000, validation_alias="AUDITOR_MAX_DELIVER")
    """Deliveries of one event before it is given up on."""
    fetch_batch: int = Field(default=256, ge=1, le=4096, validation_alias="AUDITOR_FETCH_BATCH")
    """Events fetched per pull."""
    dedupe_window: int = Field(
        default=200_000, ge=1000, le=10_000_000, validation_alias="AUDITOR_DEDUPE_WINDOW"
    )
    """Event ids remembered to drop redeliveries."""
    ledger_enabled: bool = Field(default=True, validation_alias="AUDITOR_LEDGER_ENABLED")
    """Keep the hash-chained audit ledger (`keyveil audit verify`)."""

    # Ledger signing (Ed25519, base64url raw 32-byte seed): held by this process only.
    # Required in production; in development a missing one is generated per process
    # (its public key is logged and written next to the checkpoints, so verify works).
    ledger_signing_key: SecretStr | None = Field(
        default=None, validation_alias="LEDGER_SIGNING_KEY"
    )
    """Ed25519 seed (base64url, 32 bytes) signing ledger records and checkpoints; auditor
    only, held by no NATS login; required in production (`keyveil audit keygen`)."""
    # Public keys of earlier signing keys, so records signed before a rotation verify.
    ledger_verify_keys: CommaList = Field(
        default_factory=list, validation_alias="LEDGER_VERIFY_KEY"
    )
    """Extra public keys a record may be signed with (earlier signing keys after a rotation)."""
    ledger_checkpoint_dir: Path | None = Field(
        default=None, validation_alias="LEDGER_CHECKPOINT_DIR"
    )
    """Where signed checkpoints of the ledger head are written, outside NATS; required in
    production."""
    ledger_checkpoint_interval_s: float = Field(
        default=300.0, gt=0, le=86_400, validation_alias="LEDGER_CHECKPOINT_INTERVAL_S"
    )
    """Seconds between ledger checkpoints."""
    ledger_checkpoint_keep: int = Field(
        default=48, ge=1, le=10_000, validation_alias="LEDGER_CHECKPOINT_KEEP"
    )
    """Checkpoints kept (the oldest are pruned)."""

    # Auth-failure burst per IP.
    auth_failure_threshold: int = Field(
        default=20, ge=1, validation_alias="AUDITOR_AUTH_FAILURE_THRESHOLD"
    )
    """Auth failures from one IP within AUDITOR_AUTH_FAILURE_WINDOW_S that raise an alert."""
    auth_failure_window_s: float = Field(
        default=60.0, gt=0, validation_alias="AUDITOR_AUTH_FAILURE_WINDOW_S"
    )
    """Seconds over which auth failures are counted."""

    # Token generation: per IP (floor and multiple of the learned per-IP typical rate)
    # and overall (EWMA baseline with a z-score trigger).
    token_ip_threshold: int = Field(default=8, ge=1, validation_alias="AUDITOR_TOKEN_IP_THRESHOLD")
    """Tokens issued to one IP within AUDITOR_TOKEN_WINDOW_S that raise an alert: an IP near the
    issuance limit. Keep it below VOICE_AGENT_RATE_LIMIT x window/60 (10 by default), or the
    limiter stops the burst before the detector can see it."""
    token_window_s: float = Field(default=60.0, gt=0, validation_alias="AUDITOR_TOKEN_WINDOW_S")
    """Seconds over which per-IP token issuance is counted."""
    token_rate_min_count: int = Field(
        default=50, ge=1, validation_alias="AUDITOR_TOKEN_RATE_MIN_COUNT"
    )
    """Tokens per baseline bucket below which the overall issuance spike detector stays quiet."""
    # Per user (the hashed principal): an issuance burst, and one login used from many IPs.
    token_user_threshold: int = Field(
        default=20, ge=1, validation_alias="AUDITOR_TOKEN_USER_THRESHOLD"
    )
    """Tokens one user may get within AUDITOR_TOKEN_WINDOW_S before an alert."""
    user_ip_threshold: int = Field(default=5, ge=2, validation_alias="AUDITOR_USER_IP_THRESHOLD")
    """Distinct client IPs one user may appear from within AUDITOR_USER_IP_WINDOW_S."""
    user_ip_window_s: float = Field(
        default=600.0, gt=0, validation_alias="AUDITOR_USER_IP_WINDOW_S"
    )
    """Seconds over which a user's client IPs are counted."""

    # Proxy error rate.
    proxy_error_ratio: float = Field(
        default=0.25, gt=0, le=1, validation_alias="AUDITOR_PROXY_ERROR_RATIO"
    )
    """Share of failed proxy requests that raises an alert."""
    proxy_error_min_requests: int = Field(
        default=20, ge=1, validation_alias="AUDITOR_PROXY_ERROR_MIN_REQUESTS"
    )
    """Proxy requests within the window before the error ratio is judged."""
    proxy_error_window_s: float = Field(
        default=60.0, gt=0, validation_alias="AUDITOR_PROXY_ERROR_WINDOW_S"
    )
    """Seconds over which the proxy error ratio is measured."""

    # Usage spikes (per key, per token subject) and the overall token rate baseline.
    baseline_bucket_s: float = Field(
        default=60.0, gt=0, validation_alias="AUDITOR_BASELINE_BUCKET_S"
    )
    """Seconds per bucket of the usage baselines."""
    baseline_alpha: float = Field(
        default=0.1, gt=0, lt=1, validation_alias="AUDITOR_BASELINE_ALPHA"
    )
    """Smoothing factor of the usage baselines (EWMA)."""
    baseline_warmup_buckets: int = Field(
        default=10, ge=1, validation_alias="AUDITOR_BASELINE_WARMUP_BUCKETS"
    )
    """Buckets learned before a baseline can raise a spike alert."""
    spike_z: float = Field(default=6.0, gt=0, validation_alias="AUDITOR_SPIKE_Z")
    """Standard deviations above the baseline that count as a spike."""
    spike_min_count: int = Field(default=60, ge=1, validation_alias="AUDITOR_SPIKE_MIN_COUNT")
    """Events per bucket below which no spike is raised."""
    spend_min_micros: int = Field(
        default=100_000, ge=1, validation_alias="AUDITOR_SPEND_MIN_MICROS"
    )
    """Micro-dollars an app spends per bucket below which no spend spike is raised."""
    max_tracked: int = Field(default=50_000, ge=100, validation_alias="AUDITOR_MAX_TRACKED")
    """Keys, tokens and IPs tracked at once by each detector (oldest forgotten first)."""

    # Replay and tampering (per token, else per IP).
    replay_threshold: int = Field(default=3, ge=1, validation_alias="AUDITOR_REPLAY_THRESHOLD")
    """Replayed requests per token (else IP) within the window that raise an alert."""
    tamper_threshold: int = Field(default=3, ge=1, validation_alias="AUDITOR_TAMPER_THRESHOLD")
    """Tampered requests (bad signature or digest) within the window that raise an alert."""
    replay_window_s: float = Field(default=300.0, gt=0, validation_alias="AUDITOR_REPLAY_WINDOW_S")
    """Seconds over which replays and tampering are counted."""

    # Geography.
    geo_token_window_s: float = Field(
        default=3600.0, gt=0, validation_alias="AUDITOR_GEO_TOKEN_WINDOW_S"
    )
    """Seconds within which one token used from two countries raises an alert."""
    geo_key_warmup_events: int = Field(
        default=50, ge=1, validation_alias="AUDITOR_GEO_KEY_WARMUP_EVENTS"
    )
    """Events per key before a new country raises an alert."""

    # One incident, one alert: the same (type, subject) stays quiet this long.
    alert_cooldown_s: float = Field(
        default=600.0, ge=0, validation_alias="AUDITOR_ALERT_COOLDOWN_S"
    )
    """Seconds the same alert (type, subject) stays quiet after firing."""
    rotation_cooldown_s: float = Field(
        default=86_400.0, ge=0, validation_alias="AUDITOR_ROTATION_COOLDOWN_S"
    )
    """Seconds between repeated rotation-overdue alerts for one key."""

    # Webhook delivery (Slack incoming webhook or Alertmanager /api/v2/alerts).
    alert_webhook_url: SecretStr | None = Field(default=None, validation_alias="ALERT_WEBHOOK_URL")
    """Where alerts leave the system: a Slack incoming webhook or Alertmanager's
    /api/v2/alerts; https in production."""
    alert_webhook_format: str = Field(
        default="slack", pattern="^(slack|alertmanager)$", validation_alias="ALERT_WEBHOOK_FORMAT"
    )
    """Body format of the webhook: slack or alertmanager."""
    alert_webhook_attempts: int = Field(
        default=5, ge=1, le=20, validation_alias="ALERT_WEBHOOK_ATTEMPTS"
    )
    """Delivery attempts per alert."""
    alert_webhook_backoff_s: float = Field(
        default=0.5, gt=0, le=60, validation_alias="ALERT_WEBHOOK_BACKOFF_S"
    )
    """First retry delay in seconds (doubles per attempt)."""
    alert_webhook_min_severity: str = Field(
        default="warning",
        pattern="^(info|warning|critical)$",
        validation_alias="ALERT_WEBHOOK_MIN_SEVERITY",
    )
    """Least severe alert sent to the webhook: info, warning or critical."""

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
