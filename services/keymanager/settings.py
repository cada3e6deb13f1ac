"""Key-manager settings: the KEK secrets, the bootstrap key, lease and rotation policy."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.crypto import Kem
from shared.errors import ConfigError
from shared.settings import CommaList as CommaList
from shared.settings import CommonSettings, check_secret_strength, split_commas

__all__ = ["KekProviderName", "Settings"]

_DAY_S = 86_400.0


class KekProviderName(StrEnum):
    local = "local"
    vault_transit = "vault-transit"
    aws_kms = "aws-kms"


class Settings(CommonSettings):
    """Environment of `python -m services.keymanager`."""

    port: int = Field(default=8082, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    """TCP port the service listens on (HTTP: API, /healthz, /readyz, /metrics)."""

    # Key custody: where the KEK lives (see kek.py). `local` needs KEY_ENCRYPTION_SECRET.
    kek_provider: KekProviderName = Field(
        default=KekProviderName.local, validation_alias="KEK_PROVIDER"
    )
    """Where the key-encryption key lives: local (KEY_ENCRYPTION_SECRET), vault-transit or
    aws-kms."""
    kek_previous_provider: KekProviderName | None = Field(
        default=None, validation_alias="KEK_PREVIOUS_PROVIDER"
    )
    """A previous provider still read while migrating (only `local`); `keyveil keys rewrap`
    then moves every record to KEK_PROVIDER."""
    kek_cache_ttl_s: float = Field(
        default=300.0, ge=0, le=86_400, validation_alias="KEK_CACHE_TTL_S"
    )
    """Seconds an unwrapped data key stays in memory after its unwrap (0: never cached)."""
    kek_cache_max: int = Field(default=1024, ge=0, le=1_000_000, validation_alias="KEK_CACHE_MAX")
    """Most unwrapped data keys kept in memory at once."""
    kek_timeout_s: float = Field(default=5.0, gt=0, le=120, validation_alias="KEK_TIMEOUT_S")
    """Seconds one Vault/KMS call may take."""
    kek_rewrap_interval_s: float | None = Field(
        default=None, gt=0, le=365 * _DAY_S, validation_alias="KEK_REWRAP_INTERVAL_S"
    )
    """Rewrap every record under the current KEK version this often (unset: only on command)."""
    vault_addr: str | None = Field(default=None, validation_alias="VAULT_ADDR")
    """Vault/OpenBao address for vault-transit (https in production)."""
    vault_token: SecretStr | None = Field(default=None, validation_alias="VAULT_TOKEN")
    """A Vault token (prefer VAULT_K8S_ROLE or AppRole in production)."""
    vault_role_id: str | None = Field(default=None, validation_alias="VAULT_ROLE_ID")
    """AppRole role id for the Vault login."""
    vault_secret_id: SecretStr | None = Field(default=None, validation_alias="VAULT_SECRET_ID")
    """AppRole secret id for the Vault login."""
    vault_approle_mount: str = Field(default="approle", validation_alias="VAULT_APPROLE_MOUNT")
    """Mount path of Vault's AppRole auth method."""
    vault_k8s_role: str | None = Field(default=None, validation_alias="VAULT_K8S_ROLE")
    """Vault Kubernetes-auth role: the key-manager logs in with its service-account token."""
    vault_k8s_mount: str = Field(default="kubernetes", validation_alias="VAULT_K8S_MOUNT")
    """Mount path of Vault's Kubernetes auth method."""
    vault_k8s_token_path: Path = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        validation_alias="VAULT_K8S_TOKEN_PATH",
    )
    """The projected service-account token used for Kubernetes auth."""
    vault_transit_mount: str = Field(default="transit", validation_alias="VAULT_TRANSIT_MOUNT")
    """Mount path of Vault's transit secrets engine."""
    vault_transit_key: str | None = Field(default=None, validation_alias="VAULT_TRANSIT_KEY")
    """The transit key (derived) that wraps data keys."""
    vault_cacert: str | None = Field(default=None, validation_alias="VAULT_CACERT")
    """CA bundle that signs the Vault server's certificate."""
    kms_key_id: str | None = Field(default=None, validation_alias="KMS_KEY_ID")
    """AWS KMS key id, ARN or alias that wraps data keys (aws-kms)."""
    aws_region: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    """AWS region of the KMS key (else from the standard AWS chain)."""
    aws_endpoint_url: str | None = Field(default=None, validation_alias="AWS_ENDPOINT_URL")
    """A KMS endpoint other than AWS's own (tests, VPC endpoints)."""

    key_encryption_secret: SecretStr | None = Field(
        default=None, validation_alias="KEY_ENCRYPTION_SECRET"
    )
    """Key-encryption key source for the keys at rest while KEK_PROVIDER (or
    KEK_PREVIOUS_PROVIDER) is `local`: 32+ characters, high entropy. Key-manager only."""
    key_encryption_secret_previous: SecretStr | None = Field(
        default=None, validation_alias="KEY_ENCRYPTION_SECRET_PREVIOUS"
    )
    """The former KEY_ENCRYPTION_SECRET during a KEK rotation (`keyveil keys rewrap`); must
    differ from the current one."""
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    """Provider key imported once at first start, then stored encrypted; give it to the
    key-manager only."""

    # Storage: the JetStream KV bucket (a contract; overridable only to isolate tests).
    kv_bucket: str = Field(
        default="KEYVEIL_KEYS", pattern=r"^[A-Za-z0-9_-]+$", validation_alias="KEYMANAGER_KV_BUCKET"
    )
    """JetStream KV bucket of the encrypted key records (override only to isolate tests)."""
    kv_replicas: int = Field(default=1, ge=1, le=5, validation_alias="KEYMANAGER_KV_REPLICAS")
    """Replicas of the key bucket."""
    kv_history: int = Field(default=16, ge=1, le=64, validation_alias="KEYMANAGER_KV_HISTORY")
    """Versions kept per key record in the bucket."""

    # Leases.
    lease_ttl_s: int = Field(default=300, ge=10, le=3600, validation_alias="KEYMANAGER_LEASE_TTL_S")
    """Seconds a key lease is valid."""
    allowed_requesters: CommaList = Field(
        default_factory=lambda: ["token", "proxy"],
        validation_alias="KEYMANAGER_ALLOWED_REQUESTERS",
    )
    """Comma-separated NATS users allowed to lease keys."""
    lease_kems: CommaList = Field(
        default_factory=lambda: [Kem.x25519.value, Kem.mlkem768_x25519.value],
        validation_alias="KEYMANAGER_LEASE_KEMS",
    )
    """Comma-separated key encapsulation mechanisms a lease may be sealed with."""
    # Replies go only to `_INBOX_<requester>.…` (shared.bus.Responder): under the NATS
    # permissions only that user can subscribe there, so the inbox proves who asked.

    # Rotation policy.
    rotation_grace_s: int = Field(
        default=3600, ge=0, le=30 * 86_400, validation_alias="KEYMANAGER_ROTATION_GRACE_S"
    )
    """Seconds a rotated-out key version keeps serving."""
    max_key_age_days: float | None = Field(
        default=None, gt=0, le=3650, validation_alias="KEYMANAGER_MAX_KEY_AGE_DAYS"
    )
    """Days after which a key is overdue for rotation (default 7 in staging/production, 30 in
    development; the KeyveilKeyTooOld rule uses 7)."""
    policy_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, validation_alias="KEYMANAGER_POLICY_INTERVAL_S"
    )
    """Seconds between rotation-policy checks."""
    rotation_due_interval_s: float = Field(
        default=3600.0, ge=0, le=7 * 86_400, validation_alias="KEYMANAGER_ROTATION_DUE_INTERVAL_S"
    )
    """Seconds between repeated rotation-due audit events for one key (0: every check)."""

    _split = field_validator("allowed_requesters", "lease_kems", mode="before")(split_commas)

    @field_validator("key_encryption_secret")
    @classmethod
    def _strong_kek(cls, value: SecretStr | None) -> SecretStr | None:
        broken = check_secret_strength(value.get_secret_value()) if value is not None else None
        if broken:
            raise ValueError(broken)
        return value

    @model_validator(mode="after")
    def _custody_rules(self) -> Self:
        """Each provider names what it needs, by variable."""
        problems: list[tuple[str, str]] = []
        used = {self.kek_provider, self.kek_previous_provider}
        if self.kek_previous_provider is not None:
            if self.kek_previous_provider is self.kek_provider:
                problems.append(("KEK_PREVIOUS_PROVIDER", "must differ from KEK_PROVIDER"))
            if self.kek_previous_provider is not KekProviderName.local:
                problems.append(
                    ("KEK_PREVIOUS_PROVIDER", "only `local` can be a previous provider")
                )
        if KekProviderName.local in used and self.key_encryption_secret is None:
            problems.append(("KEY_ENCRYPTION_SECRET", "required by the local KEK provider"))
        if KekProviderName.vault_transit in used:
            if not self.vault_addr:
                problems.append(("VAULT_ADDR", "required when KEK_PROVIDER=vault-transit"))
            if not self.vault_transit_key:
                problems.append(("VAULT_TRANSIT_KEY", "required when KEK_PROVIDER=vault-transit"))
            methods = [
                self.vault_token is not None,
                self.vault_role_id is not None or self.vault_secret_id is not None,
                self.vault_k8s_role is not None,
            ]
            if sum(methods) != 1:
                problems.append(
                    (
                        "VAULT_TOKEN",
                        "give exactly one Vault login: VAULT_TOKEN, VAULT_ROLE_ID with "
                        "VAULT_SECRET_ID, or VAULT_K8S_ROLE",
                    )
                )
            elif methods[1] and (self.vault_role_id is None or self.vault_secret_id is None):
                problems.append(
                    ("VAULT_SECRET_ID", "AppRole needs VAULT_ROLE_ID and VAULT_SECRET_ID")
                )
        if KekProviderName.aws_kms in used and not self.kms_key_id:
            problems.append(("KMS_KEY_ID", "required when KEK_PROVIDER=aws-kms"))
        if problems:
            raise ConfigError(problems)
        return self

    @field_validator("lease_kems")
    @classmethod
    def _known_kems(cls, value: list[str]) -> list[str]:
        known = {kem.value for kem in Kem}
        unknown = [v for v in value if v not in known]
        if unknown or not value:
            raise ValueError(f"each entry must be one of {', '.join(sorted(known))}")
        return value

    @field_validator("allowed_requesters")
    @classmethod
    def _some_requesters(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one requester identity (e.g. token,proxy)")
        return value

    @field_validator("key_encryption_secret_previous")
    @classmethod
    def _previous_differs(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        current = info.data.get("key_encryption_secret")
        if value is not None and current is not None and value == current:
            raise ValueError("must differ from KEY_ENCRYPTION_SECRET")
        return value

    @property
    def max_key_age_s(self) -> float:
        """7 days in production (and staging) by default, 30 days in development."""
        if self.max_key_age_days is not None:
            return self.max_key_age_days * _DAY_S
        return (30.0 if self.node_env.value == "development" else 7.0) * _DAY_S

    @property
    def kems(self) -> frozenset[Kem]:
        return frozenset(Kem(v) for v in self.lease_kems)

    def secret_values(self) -> list[str]:
        values = [self.key_encryption_secret, self.key_encryption_secret_previous]
        values += [self.openai_api_key, self.vault_token, self.vault_secret_id]
        return [
            *super().secret_values(),
            *(v.get_secret_value() for v in values if v is not None),
        ]
