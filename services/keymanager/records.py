"""One key version as stored in the KV bucket, and what binds its ciphertext to it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.keymanager.kek import WrapContext
from shared.crypto import Envelope, b64url_decode, b64url_encode
from shared.keyadmin import (
    ENVIRONMENT_PATTERN,
    KEY_ID_PATTERN,
    PROVIDER_PATTERN,
    KeyInfo,
    KeyStatus,
)

__all__ = ["KeyRecord"]

RECORD_SCHEMA = 1


class KeyRecord(BaseModel):
    """A provider key version: metadata in the clear, the key only as an envelope."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = RECORD_SCHEMA
    key_id: str = Field(pattern=KEY_ID_PATTERN)
    provider: str = Field(pattern=PROVIDER_PATTERN)
    environment: str = Field(pattern=ENVIRONMENT_PATTERN)
    version: int = Field(ge=1)
    status: KeyStatus
    created_at: float
    rotated_at: float | None = None
    retire_at: float | None = None
    revoked_at: float | None = None
    expires_at: float
    fingerprint: str
    fingerprint_kek: str
    last4: str = Field(max_length=4)
    kek_id: str
    wrapped_key: str
    ciphertext: str
    updated_by: str

    @property
    def kv_key(self) -> str:
        return record_key(self.provider, self.environment, self.key_id, self.version)

    @property
    def associated_data(self) -> bytes:
        """Binds the ciphertext to this record: a swapped ciphertext fails to decrypt."""
        parts = ("keyveil-key-v1", self.key_id, str(self.version), self.provider, self.environment)
        return "|".join(parts).encode()

    @property
    def wrap_context(self) -> WrapContext:
        """The identity a KEK provider binds the data key to (Vault context, KMS context)."""
        return WrapContext(
            aad=self.associated_data,
            fields={
                "keyveil": "key-v1",
                "key_id": self.key_id,
                "version": str(self.version),
                "provider": self.provider,
                "environment": self.environment,
            },
        )

    @property
    def envelope(self) -> Envelope:
        return Envelope(
            self.kek_id, b64url_decode(self.wrapped_key), b64url_decode(self.ciphertext)
        )

    def with_envelope(self, envelope: Envelope, **changes: object) -> KeyRecord:
        return self.model_copy(
            update={
                "kek_id": envelope.kek_id,
                "wrapped_key": b64url_encode(envelope.wrapped_key),
                "ciphertext": b64url_encode(envelope.ciphertext),
                **changes,
            }
        )

    def leasable(self, now: float) -> bool:
        if self.status is KeyStatus.active:
            return True
        return self.status is KeyStatus.retiring and (self.retire_at or 0.0) > now

    def info(self) -> KeyInfo:
        return KeyInfo.model_validate(
            self.model_dump(exclude={"wrapped_key", "ciphertext", "updated_by", "schema_version"})
        )


def record_key(provider: str, environment: str, key_id: str, version: int) -> str:
    return f"{provider}.{environment}.{key_id}.{version}"
