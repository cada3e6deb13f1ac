"""Key administration over NATS: one typed request and reply per `keyveil.km.admin.<op>`.

The operator CLI and the key-manager both import these. A provider key never crosses
the bus in the clear: the CLI first asks `intake` for the key-manager's intake public
key (derived from KEY_ENCRYPTION_SECRET, so every replica holds it), then sends the key
HPKE-sealed to it, bound by `intake_info` to the operation and its target.
Replies never carry key material: only id, version, status, times, fingerprint and
the last four characters.
"""

from __future__ import annotations

import secrets
import time
from enum import StrEnum
from typing import TypeVar

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field

from shared import bus
from shared.crypto import Kem, b64url_decode, b64url_encode, seal_for_requester

__all__ = [
    "ADMIN_PREFIX",
    "ADMIN_SUBJECTS",
    "ENVIRONMENT_PATTERN",
    "KEY_ID_PATTERN",
    "OPERATOR_USER",
    "PROVIDER_PATTERN",
    "AddKeyRequest",
    "AdminOp",
    "BackupDocument",
    "BackupReply",
    "BackupRequest",
    "DoctorReply",
    "DoctorRequest",
    "IntakeReply",
    "IntakeRequest",
    "KeyAdminClient",
    "KeyInfo",
    "KeyListReply",
    "KeyMutationReply",
    "KeyStatus",
    "ListKeysRequest",
    "RestoreReply",
    "RestoreRequest",
    "RevokeKeyRequest",
    "RewrapReply",
    "RewrapRequest",
    "RotateKeyRequest",
    "SealedSecret",
    "ShowKeyRequest",
    "admin_subject",
    "intake_info",
]

ADMIN_PREFIX = "keyveil.km.admin"
OPERATOR_USER = "operator"
"""The only NATS user whose inbox the key-manager answers admin requests on."""
PROVIDER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
ENVIRONMENT_PATTERN = r"^(development|staging|production)$"
KEY_ID_PATTERN = r"^key_[0-9a-f]{16}$"


class AdminOp(StrEnum):
    intake = "intake"
    add = "add"
    list = "list"
    show = "show"
    rotate = "rotate"
    revoke = "revoke"
    rewrap = "rewrap"
    doctor = "doctor"
    backup = "backup"
    restore = "restore"


def admin_subject(op: AdminOp) -> str:
    return f"{ADMIN_PREFIX}.{op.value}"


ADMIN_SUBJECTS = {op: admin_subject(op) for op in AdminOp}


class KeyStatus(StrEnum):
    active = "active"
    retiring = "retiring"  # superseded; still served during the grace period
    retired = "retired"  # grace period over; never served again
    revoked = "revoked"  # stopped at once by an operator


def intake_info(op: AdminOp, *, target: str, nonce: str) -> bytes:
    """HPKE info for a sealed key: it opens only for this operation on this target.

    The target of `add` is `<provider>/<environment>`; of `rotate`, the key id.
    """
    return "|".join(("keyveil-intake-v1", op.value, target, nonce)).encode()


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: str = Field(default="operator", pattern=r"^[A-Za-z0-9_.@:-]{1,64}$")


class SealedSecret(BaseModel):
    """A provider key sealed to the intake key (X25519 HPKE), never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kek_id: str = Field(max_length=64)
    nonce: str = Field(pattern=r"^[A-Za-z0-9_-]{16,64}$")
    sealed: str = Field(max_length=16_384)
    kem: Kem = Kem.x25519


class IntakeRequest(_Request):
    pass


class IntakeReply(BaseModel):
    kek_id: str
    kem: Kem
    public_key: str


class AddKeyRequest(_Request):
    provider: str = Field(default="openai", pattern=PROVIDER_PATTERN)
    environment: str = Field(pattern=ENVIRONMENT_PATTERN)
    secret: SealedSecret


class ListKeysRequest(_Request):
    provider: str | None = Field(default=None, pattern=PROVIDER_PATTERN)
    environment: str | None = Field(default=None, pattern=ENVIRONMENT_PATTERN)
    include_retired: bool = False


class ShowKeyRequest(_Request):
    key_id: str = Field(pattern=KEY_ID_PATTERN)


class RotateKeyRequest(_Request):
    key_id: str = Field(pattern=KEY_ID_PATTERN)
    secret: SealedSecret
    grace_s: int | None = Field(default=None, ge=0, le=30 * 86_400)


class RevokeKeyRequest(_Request):
    key_id: str = Field(pattern=KEY_ID_PATTERN)
    version: int | None = Field(default=None, ge=1, description="None: every live version")


class RewrapRequest(_Request):
    pass


class KeyInfo(BaseModel):
    """What an operator may see about one key version: never the key."""

    key_id: str
    provider: str
    environment: str
    version: int
    status: KeyStatus
    created_at: float
    rotated_at: float | None = None
    retire_at: float | None = None
    revoked_at: float | None = None
    expires_at: float
    fingerprint: str
    last4: str
    kek_id: str

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.created_at)


class KeyListReply(BaseModel):
    keys: list[KeyInfo]


class KeyMutationReply(BaseModel):
    """The versions an operation changed, newest first."""

    changed: list[KeyInfo]


class RewrapReply(BaseModel):
    kek_id: str
    rewrapped: int
    already_current: int
    failed: list[str] = Field(default_factory=list, description="key ids that did not open")


class DoctorRequest(_Request):
    pass


class DoctorReply(BaseModel):
    """Whether key custody is sound, and if not, what to do; never a secret."""

    ok: bool
    reason: str
    provider: str
    previous_provider: str | None = None
    custody_kek_id: str | None = None
    details: dict[str, str] = Field(default_factory=dict)
    records: int = 0
    stale_records: int = Field(default=0, description="not under the current KEK version")
    unreadable: list[str] = Field(default_factory=list)


BACKUP_FORMAT = "keyveil-keys-backup-v1"


class BackupDocument(BaseModel):
    """Encrypted records and their metadata, signed by the key-manager: never plaintext.

    `signature` is an HMAC under a key derived from the custody seed, which only the KEK
    provider can unwrap; restore unwraps it, then refuses a document that does not match.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = BACKUP_FORMAT
    created_at: float
    kek_provider: str
    custody: dict[str, object]
    records: list[dict[str, object]]
    signed_by: str
    signature: str


class BackupRequest(_Request):
    pass


class BackupReply(BaseModel):
    document: BackupDocument


class RestoreRequest(_Request):
    document: BackupDocument


class RestoreReply(BaseModel):
    restored: int
    already_present: int
    conflicts: list[str] = Field(default_factory=list, description="kept as found in the bucket")
    unreadable: list[str] = Field(default_factory=list)


R = TypeVar("R", bound=BaseModel)


class KeyAdminClient:
    """The operator's side of the admin subjects; a key given to it leaves only sealed."""

    def __init__(self, nc: NATS, *, actor: str = "operator", timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._actor = actor
        self._timeout = timeout_s

    async def _call(self, op: AdminOp, request: BaseModel, reply_type: type[R]) -> R:
        return await bus.request(
            self._nc,
            admin_subject(op),
            request,
            reply_type,
            timeout=self._timeout,
            requester=OPERATOR_USER,
        )

    async def _seal(self, op: AdminOp, target: str, secret: bytes) -> SealedSecret:
        intake = await self._call(AdminOp.intake, IntakeRequest(actor=self._actor), IntakeReply)
        nonce = secrets.token_urlsafe(18)
        sealed = seal_for_requester(
            secret,
            b64url_decode(intake.public_key),
            info=intake_info(op, target=target, nonce=nonce),
            kem=intake.kem,
        )
        return SealedSecret(
            kek_id=intake.kek_id, nonce=nonce, sealed=b64url_encode(sealed), kem=intake.kem
        )

    async def add(self, secret: bytes, *, environment: str, provider: str = "openai") -> KeyInfo:
        sealed = await self._seal(AdminOp.add, f"{provider}/{environment}", secret)
        request = AddKeyRequest(
            actor=self._actor, provider=provider, environment=environment, secret=sealed
        )
        return (await self._call(AdminOp.add, request, KeyMutationReply)).changed[0]

    async def rotate(
        self, key_id: str, secret: bytes, *, grace_s: int | None = None
    ) -> list[KeyInfo]:
        sealed = await self._seal(AdminOp.rotate, key_id, secret)
        request = RotateKeyRequest(actor=self._actor, key_id=key_id, secret=sealed, grace_s=grace_s)
        return (await self._call(AdminOp.rotate, request, KeyMutationReply)).changed

    async def revoke(self, key_id: str, *, version: int | None = None) -> list[KeyInfo]:
        request = RevokeKeyRequest(actor=self._actor, key_id=key_id, version=version)
        return (await self._call(AdminOp.revoke, request, KeyMutationReply)).changed

    async def rewrap(self) -> RewrapReply:
        return await self._call(AdminOp.rewrap, RewrapRequest(actor=self._actor), RewrapReply)

    async def list_keys(
        self,
        *,
        provider: str | None = None,
        environment: str | None = None,
        include_retired: bool = False,
    ) -> list[KeyInfo]:
        request = ListKeysRequest(
            actor=self._actor,
            provider=provider,
            environment=environment,
            include_retired=include_retired,
        )
        return (await self._call(AdminOp.list, request, KeyListReply)).keys

    async def show(self, key_id: str) -> list[KeyInfo]:
        request = ShowKeyRequest(actor=self._actor, key_id=key_id)
        return (await self._call(AdminOp.show, request, KeyListReply)).keys

    async def doctor(self) -> DoctorReply:
        return await self._call(AdminOp.doctor, DoctorRequest(actor=self._actor), DoctorReply)

    async def backup(self) -> BackupDocument:
        reply = await self._call(AdminOp.backup, BackupRequest(actor=self._actor), BackupReply)
        return reply.document

    async def restore(self, document: BackupDocument) -> RestoreReply:
        request = RestoreRequest(actor=self._actor, document=document)
        return await self._call(AdminOp.restore, request, RestoreReply)
