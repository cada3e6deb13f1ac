"""Key-manager settings: the KEK secrets, the bootstrap key, lease and rotation policy."""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from shared.crypto import Kem
from shared.settings import CommaList as CommaList
from shared.settings import CommonSettings, check_secret_strength, split_commas

__all__ = ["Settings"]

_DAY_S = 86_400.0


class Settings(CommonSettings):
    """Environment of `python -m services.keymanager`."""

    port: int = Field(default=8082, ge=0, le=65535, validation_alias="KEYVEIL_PORT")

    key_encryption_secret: SecretStr = Field(validation_alias="KEY_ENCRYPTION_SECRET")
    key_encryption_secret_previous: SecretStr | None = Field(
        default=None, validation_alias="KEY_ENCRYPTION_SECRET_PREVIOUS"
    )
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")

    # Storage: the JetStream KV bucket (a contract; overridable only to isolate tests).
    kv_bucket: str = Field(
        default="KEYVEIL_KEYS", pattern=r"^[A-Za-z0-9_-]+$", validation_alias="KEYMANAGER_KV_BUCKET"
    )
    kv_replicas: int = Field(default=1, ge=1, le=5, validation_alias="KEYMANAGER_KV_REPLICAS")
    kv_history: int = Field(default=16, ge=1, le=64, validation_alias="KEYMANAGER_KV_HISTORY")

    # Leases.
    lease_ttl_s: int = Field(default=300, ge=10, le=3600, validation_alias="KEYMANAGER_LEASE_TTL_S")
    allowed_requesters: CommaList = Field(
        default_factory=lambda: ["token", "proxy"],
        validation_alias="KEYMANAGER_ALLOWED_REQUESTERS",
    )
    lease_kems: CommaList = Field(
        default_factory=lambda: [Kem.x25519.value, Kem.mlkem768_x25519.value],
        validation_alias="KEYMANAGER_LEASE_KEMS",
    )
    # Replies go only to `_INBOX_<requester>.…` (shared.bus.Responder): under the NATS
    # permissions only that user can subscribe there, so the inbox proves who asked.

    # Rotation policy.
    rotation_grace_s: int = Field(
        default=3600, ge=0, le=30 * 86_400, validation_alias="KEYMANAGER_ROTATION_GRACE_S"
    )
    max_key_age_days: float | None = Field(
        default=None, gt=0, le=3650, validation_alias="KEYMANAGER_MAX_KEY_AGE_DAYS"
    )
    policy_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, validation_alias="KEYMANAGER_POLICY_INTERVAL_S"
    )
    rotation_due_interval_s: float = Field(
        default=3600.0, ge=0, le=7 * 86_400, validation_alias="KEYMANAGER_ROTATION_DUE_INTERVAL_S"
    )

    _split = field_validator("allowed_requesters", "lease_kems", mode="before")(split_commas)

    @field_validator("key_encryption_secret")
    @classmethod
    def _strong_kek(cls, value: SecretStr) -> SecretStr:
        broken = check_secret_strength(value.get_secret_value())
        if broken:
            raise ValueError(broken)
        return value

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
        values.append(self.openai_api_key)
        return [
            *super().secret_values(),
            *(v.get_secret_value() for v in values if v is not None),
        ]
