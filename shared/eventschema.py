"""Typed parts of events (schema version 2): a usage event's `reason`, an audit event's `detail`.

Both are discriminated unions on `kind`, so a reader branches on a type, not on a
spelling. A refusal carries its contract code *and* its category (`shared.contract`):
the auditor counts categories, and an older reader still counts a code it does not
know yet. A `kind` a reader does not know (a newer producer) is kept as `OtherReason`
/ `OtherDetail` rather than refusing the event, as unknown fields are ignored.

    UsageEvent.reason                       AuditEvent.detail (None, sent as {}: nothing)
    ├── Refused      kind "refused"         ├── StreamDrift, TokenRevoked, RefusedDetail,
    ├── Served       kind "served"          │   Dropped, Rejected, Kek, KekMove, RewrapFailed,
    ├── Fallback     kind "fallback"        │   CustodyCreated, RotationDue, KeyRotated, Lease,
    ├── ClientGone   kind "client_gone"     │   Doctor, Backup, Restore, Listed, Shown,
    ├── BudgetWarning kind "budget_warning" │   VoicePolicyAction, VoiceClosed, VoiceCloseRequested
    └── OtherReason  (unknown kind)         ├── LegacyDetail (a v1 detail that fits no model)
                                            └── OtherDetail (unknown kind)

Version 1 events (a free-string `reason`, a free-form `detail`) stay in the streams for
their retention period; `reason_from_v1` and `detail_from_v1` read them into these
types (`UsageEvent`/`AuditEvent` call them for `schema_version` 1, or none). The v1 synonyms
("signature", "invalid_login_expired", ...) are matched there and nowhere else.

`make event-schema` (`python -m shared.eventschema`) writes the JSON Schema of both events
(docs/events.schema.json, checked for staleness by tests/shared/test_event_schema.py).
"""

from __future__ import annotations

import re
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)

from shared.contract import Category, Refusal, category_of, category_of_status
from shared.errors import ApiError

__all__ = [
    "SCHEMA_VERSION",
    "AuditDetail",
    "Backup",
    "BudgetWarning",
    "ClientGone",
    "CustodyCreated",
    "Doctor",
    "Dropped",
    "Fallback",
    "Kek",
    "KekMove",
    "KeyRejection",
    "KeyRotated",
    "Lease",
    "LegacyDetail",
    "Listed",
    "OtherDetail",
    "OtherReason",
    "Reason",
    "Refused",
    "RefusedDetail",
    "Rejected",
    "Restore",
    "RewrapFailed",
    "RotationDue",
    "Served",
    "Shown",
    "StreamDrift",
    "TokenRevoked",
    "VoiceCloseRequested",
    "VoiceClosed",
    "VoicePolicyAction",
    "detail_from_v1",
    "reason_from_v1",
]

SCHEMA_VERSION: Final = 2

# Bounded strings: an event is never a place to store whatever a caller sent.
_CODE_PATTERN: Final = r"^[a-z][a-z0-9_]{0,63}$"
_CODE: Final = re.compile(_CODE_PATTERN)
Code = Annotated[str, StringConstraints(pattern=_CODE_PATTERN)]
Label = Annotated[str, StringConstraints(max_length=64)]
Ident = Annotated[str, StringConstraints(max_length=128)]
Text = Annotated[str, StringConstraints(max_length=512)]

_FROZEN = ConfigDict(extra="ignore", frozen=True)


class _Part(BaseModel):
    model_config = _FROZEN


def _known_code(value: Any) -> Any:
    """A contract code as its `Refusal`; another code (a newer producer's, a v1 one) as is."""
    if isinstance(value, str) and not isinstance(value, Refusal):
        return Refusal.parse(value) or value
    return value


# -- usage reasons ----------------------------------------------------------------------


class Refused(_Part):
    """Refused (outcome "denied", or "error" for a 5xx) with a contract code and its category."""

    kind: Literal["refused"] = "refused"
    code: Refusal | Code
    category: Category
    why: Label | None = None
    """A bounded sub-reason where the code has several (a login's: "expired", "audience")."""

    _code = field_validator("code", mode="before")(_known_code)

    @classmethod
    def of(cls, refusal: Refusal | ApiError, *, why: str | None = None) -> Refused:
        """The reason for a refusal, its category from the contract (or the error's status)."""
        code = refusal if isinstance(refusal, Refusal) else Refusal.parse(refusal.code)
        if code is not None:
            if why is None:
                return _REFUSED[code]  # built once: refusals are the cheap path of an edge
            return cls(code=code, category=code.category, why=why)
        assert isinstance(refusal, ApiError)
        other = refusal.code if _CODE.match(refusal.code) else "not_a_code"  # never a 500
        return cls(code=other, category=category_of_status(refusal.status), why=why)


_REFUSED: Final[dict[Refusal, Refused]] = {
    member: Refused(code=member, category=member.category) for member in Refusal
}


class Served(_Part):
    """Answered without calling the provider."""

    kind: Literal["served"] = "served"
    via: Literal["cache", "demo"]


class Fallback(_Part):
    """Issued in another mode than the one asked for (auto: realtime failed, a proxy token)."""

    kind: Literal["fallback"] = "fallback"
    code: Refusal | Code
    category: Category

    _code = field_validator("code", mode="before")(_known_code)

    @classmethod
    def of(cls, code: str) -> Fallback:
        """For the failure's code; only unavailable and upstream errors fall back."""
        refusal = Refusal.parse(code)
        return cls(code=code, category=refusal.category if refusal else Category.unavailable)


class ClientGone(_Part):
    """The client went away before the answer was complete."""

    kind: Literal["client_gone"] = "client_gone"


class BudgetWarning(_Part):
    """A voice session passed the warning share of the named budget."""

    kind: Literal["budget_warning"] = "budget_warning"
    budget: Label


class OtherReason(_Part):
    """A reason of a kind this reader does not know (a newer producer)."""

    kind: Label
    category: Category | None = None


_REASON_KINDS: Final = frozenset({"refused", "served", "fallback", "client_gone", "budget_warning"})


def _kind(value: Any, known: frozenset[str]) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) and kind in known else "other"


def _reason_kind(value: Any) -> str:
    return _kind(value, _REASON_KINDS)


Reason = Annotated[
    Annotated[Refused, Tag("refused")]
    | Annotated[Served, Tag("served")]
    | Annotated[Fallback, Tag("fallback")]
    | Annotated[ClientGone, Tag("client_gone")]
    | Annotated[BudgetWarning, Tag("budget_warning")]
    | Annotated[OtherReason, Tag("other")],
    Discriminator(_reason_kind),
]

CLIENT_GONE: Final = ClientGone()
SERVED_FROM_CACHE: Final = Served(via="cache")
SERVED_BY_DEMO: Final = Served(via="demo")

_V1_SERVED: Final[dict[str, Served | ClientGone]] = {
    "cache_hit": SERVED_FROM_CACHE,
    "demo": SERVED_BY_DEMO,
    "client_gone": CLIENT_GONE,
}


def reason_from_v1(
    reason: str, *, outcome: str, event_type: str, status: int | None
) -> Refused | Served | Fallback | ClientGone | BudgetWarning:
    """What a v1 `reason` string meant, as the v2 type (the v1 spelling kept as the code)."""
    if event_type == "voice.budget.warning":
        return BudgetWarning(budget=reason[:64])
    served = _V1_SERVED.get(reason)
    if served is not None:
        return served
    code = reason.lower()[:64]
    if not _CODE.match(code):
        code = "v1_unknown"
    if code.startswith("invalid_login_"):  # the token service's v1 login refusals
        why = code.removeprefix("invalid_login_")
        return Refused(code=Refusal.LOGIN_INVALID, category=Category.auth, why=why)
    category = category_of(code) or category_of_status(status or 0)
    if outcome == "ok" and event_type == "token.issued":  # fell back: the failure's code
        return Fallback(code=code, category=category)
    return Refused(code=code, category=category)


# -- audit details ----------------------------------------------------------------------


class StreamDrift(_Part):
    """stream.drift (every service's StreamGuard): the streams and the fields that drifted."""

    kind: Literal["stream_drift"] = "stream_drift"
    streams: dict[Label, list[Label]]


class TokenRevoked(_Part):
    """token.revoked: by its holder (signed DELETE) or the operator (`keyveil tokens revoke`)."""

    kind: Literal["token_revoked"] = "token_revoked"
    via: Literal["signed_delete", "cli"]
    token_id: Ident | None = None
    session_id: Ident | None = None
    user: Ident | None = None  # the keyed hash of a user id (`--user`), never the id
    ttl_s: int | None = None
    reason: Text | None = None  # the operator's own words


class VoiceCloseRequested(_Part):
    """voice.session.close_requested (`keyveil sessions close`)."""

    kind: Literal["voice_close_requested"] = "voice_close_requested"
    voice_session_id: Ident
    via: Literal["cli"] = "cli"
    reason: Text | None = None


class VoicePolicyAction(_Part):
    """voice.policy.reverted / voice.policy.closed: the fields that left the policy."""

    kind: Literal["voice_policy"] = "voice_policy"
    voice_session_id: Ident
    api: Label
    token_id: Ident | None = None
    fields: list[Label]
    action: Literal["reverted", "closed"]
    cause: Label


class VoiceClosed(_Part):
    """voice.session.closed: why, and what was billed."""

    kind: Literal["voice_closed"] = "voice_closed"
    voice_session_id: Ident
    api: Label
    token_id: Ident | None = None
    reason: Label
    billed_s: float
    duration_s: float


class RefusedDetail(Refused):
    """A refused key-manager request (lease_denied, lease_failed, admin_<op> denied)."""

    key_id: Ident | None = None

    @classmethod
    def of(
        cls, refusal: Refusal | ApiError, *, why: str | None = None, key_id: str | None = None
    ) -> RefusedDetail:
        reason = Refused.of(refusal, why=why)
        return cls(code=reason.code, category=reason.category, why=reason.why, key_id=key_id)


class Dropped(_Part):
    """lease_dropped / admin_dropped: a request with a reply subject its login may not use."""

    kind: Literal["dropped"] = "dropped"
    reason: Literal["reply_not_allowed"] = "reply_not_allowed"
    reply: Text
    operation: Label | None = None


class KeyRejection(StrEnum):
    """Why the key-manager would not store, restore or open a key record."""

    duplicate = "duplicate"  # key_store: the key is already stored
    active_exists = "active_exists"  # key_store: the slot has an active key
    custody = "custody"  # keys_restore: the backup's custody record does not open
    bad_signature = "bad_signature"  # keys_restore: the backup signature does not verify
    unknown_kek = "unknown_kek"  # decrypt_failed: wrapped under a KEK version not held
    kek_refused = "kek_refused"  # decrypt_failed: the KEK provider refused to unwrap
    integrity = "integrity"  # decrypt_failed: tampered ciphertext or wrong context
    malformed = "malformed"  # decrypt_failed: not an envelope


class Rejected(_Part):
    """key_store / keys_restore denied, decrypt_failed."""

    kind: Literal["rejected"] = "rejected"
    reason: KeyRejection


class Kek(_Part):
    """kek_verify / kek_unavailable: the provider and what it said (never key material)."""

    kind: Literal["kek"] = "kek"
    kek_provider: Label
    reason: Text


class KekMove(_Part):
    """key_rewrap / custody_rewrap: moved from one KEK version to another."""

    kind: Literal["kek_move"] = "kek_move"
    from_kek: Ident
    to_kek: Ident


class RewrapFailed(_Part):
    """key_rewrap failure: the records that could not be re-wrapped."""

    kind: Literal["rewrap_failed"] = "rewrap_failed"
    failed: list[Ident] = Field(max_length=10_000)


class CustodyCreated(_Part):
    kind: Literal["custody_created"] = "custody_created"
    kek_id: Ident


class RotationDue(_Part):
    """rotation_due: the key's age and the policy's maximum, in seconds."""

    kind: Literal["rotation_due"] = "rotation_due"
    age_s: int
    max_age_s: int | None = None


class KeyRotated(_Part):
    kind: Literal["key_rotated"] = "key_rotated"
    grace_s: float
    previous_versions: list[int]


class Lease(_Part):
    """lease_granted."""

    kind: Literal["lease"] = "lease"
    lease_id: Ident
    expires_at: float
    kem: Label
    instance_id: Ident


class Doctor(_Part):
    kind: Literal["doctor"] = "doctor"
    ok: bool
    unreadable: int


class Backup(_Part):
    kind: Literal["backup"] = "backup"
    records: int
    signed_by: Ident


class Restore(_Part):
    kind: Literal["restore"] = "restore"
    restored: int
    already_present: int
    conflicts: int


class Listed(_Part):
    kind: Literal["listed"] = "listed"
    count: int


class Shown(_Part):
    kind: Literal["shown"] = "shown"
    shown_key_id: Ident


class LegacyDetail(BaseModel):
    """A v1 detail no v2 model fits: kept as it was (the ledger hashes the raw event anyway)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["v1"] = "v1"


class OtherDetail(BaseModel):
    """A detail of a kind this reader does not know (a newer producer): kept as sent."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Label


_DETAILS: Final[tuple[type[BaseModel], ...]] = (
    StreamDrift,
    TokenRevoked,
    VoiceCloseRequested,
    VoicePolicyAction,
    VoiceClosed,
    RefusedDetail,
    Dropped,
    Rejected,
    Kek,
    KekMove,
    RewrapFailed,
    CustodyCreated,
    RotationDue,
    KeyRotated,
    Lease,
    Doctor,
    Backup,
    Restore,
    Listed,
    Shown,
    LegacyDetail,
)
_DETAIL_KINDS: Final = frozenset(m.model_fields["kind"].default for m in _DETAILS)


def _detail_kind(value: Any) -> str:
    return _kind(value, _DETAIL_KINDS)


AuditDetail = Annotated[
    Annotated[StreamDrift, Tag("stream_drift")]
    | Annotated[TokenRevoked, Tag("token_revoked")]
    | Annotated[VoiceCloseRequested, Tag("voice_close_requested")]
    | Annotated[VoicePolicyAction, Tag("voice_policy")]
    | Annotated[VoiceClosed, Tag("voice_closed")]
    | Annotated[RefusedDetail, Tag("refused")]
    | Annotated[Dropped, Tag("dropped")]
    | Annotated[Rejected, Tag("rejected")]
    | Annotated[Kek, Tag("kek")]
    | Annotated[KekMove, Tag("kek_move")]
    | Annotated[RewrapFailed, Tag("rewrap_failed")]
    | Annotated[CustodyCreated, Tag("custody_created")]
    | Annotated[RotationDue, Tag("rotation_due")]
    | Annotated[KeyRotated, Tag("key_rotated")]
    | Annotated[Lease, Tag("lease")]
    | Annotated[Doctor, Tag("doctor")]
    | Annotated[Backup, Tag("backup")]
    | Annotated[Restore, Tag("restore")]
    | Annotated[Listed, Tag("listed")]
    | Annotated[Shown, Tag("shown")]
    | Annotated[LegacyDetail, Tag("v1")]
    | Annotated[OtherDetail, Tag("other")],
    Discriminator(_detail_kind),
]

# v1 audit types and the kind their detail has (first match; types are globs).
_V1_KINDS: Final[tuple[tuple[str, str], ...]] = (
    ("stream.drift", "stream_drift"),
    ("token.revoked", "token_revoked"),
    ("voice.session.close_requested", "voice_close_requested"),
    ("voice.policy.*", "voice_policy"),
    ("voice.session.closed", "voice_closed"),
    ("*_dropped", "dropped"),
    ("decrypt_failed", "rejected"),
    ("kek_unavailable", "kek"),
    ("kek_verify", "kek"),
    ("custody_created", "custody_created"),
    ("rotation_due", "rotation_due"),
    ("key_rotate", "key_rotated"),
    ("lease_granted", "lease"),
    ("admin_doctor", "doctor"),
    ("keys_backup", "backup"),
    ("admin_list", "listed"),
    ("admin_show", "shown"),
)
_KEY_REJECTIONS: Final = frozenset(KeyRejection)


def _v1_kind(event_type: str, outcome: str, detail: dict[str, Any]) -> str | None:
    reason = detail.get("reason")
    if event_type in ("key_store", "keys_restore") and reason in _KEY_REJECTIONS:
        return "rejected"
    if event_type in ("key_rewrap", "custody_rewrap"):
        return "rewrap_failed" if "failed" in detail else "kek_move"
    if event_type == "keys_restore":
        return "restore"
    for pattern, kind in _V1_KINDS:
        if fnmatchcase(event_type, pattern):
            return kind
    if outcome != "success" and isinstance(reason, str):
        return "refused"  # lease_denied, lease_failed, admin_<op> denied: an error code
    return None


def detail_from_v1(event_type: str, outcome: str, detail: dict[str, Any]) -> Any:
    """A v1 detail dict as the v2 model its type has (None when empty; `LegacyDetail` when
    nothing fits: a v1 event is never refused for its detail)."""
    if not detail:
        return None
    kind = _v1_kind(event_type, outcome, detail)
    fields = dict(detail)
    if kind == "rotation_due" and "age_s" not in fields and "age_days" in fields:
        fields["age_s"] = round(float(fields["age_days"]) * 86_400)  # the oldest events
    if kind == "refused":
        code = str(fields.pop("reason"))
        refused = Refused.of(Refusal.parse(code) or Refusal.INTERNAL_ERROR)
        fields.update(code=code, category=refused.category)
    model = next((m for m in _DETAILS if m.model_fields["kind"].default == kind), None)
    if model is not None:
        try:
            return model.model_validate({**fields, "kind": kind})
        except ValidationError:
            pass
    return LegacyDetail.model_validate(detail)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the v2 usage and audit events (docs/events.schema.json)."""
    from pydantic.json_schema import models_json_schema

    from shared.events import AuditEvent, UsageEvent

    _, schema = models_json_schema(
        [(UsageEvent, "validation"), (AuditEvent, "validation")],
        title=f"keyveil events, schema version {SCHEMA_VERSION}",
    )
    return schema


if __name__ == "__main__":
    import json

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
