"""Doctor, backup and restore: the admin operations of key custody.

A backup is the custody record and every key record exactly as stored (envelopes, never
plaintext), signed with an HMAC under a key derived from the custody seed. Only a
key-manager whose KEK provider unwraps that seed can check the signature, so restore
refuses a tampered document, or one made under another custody, before writing anything.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from services.keymanager.admin import AdminDesk, _parse
from services.keymanager.custody import CustodyRecord, explain
from services.keymanager.errors import ConflictError
from services.keymanager.kek import KekUnavailableError
from services.keymanager.keys import KeyService
from services.keymanager.records import KeyRecord
from shared.crypto import EnvelopeError, Kek
from shared.errors import ApiError, BadRequestError, UnavailableError
from shared.eventschema import Backup, Doctor, KeyRejection, Rejected, Restore
from shared.keyadmin import (
    BACKUP_FORMAT,
    AdminOp,
    BackupDocument,
    BackupReply,
    BackupRequest,
    DoctorReply,
    DoctorRequest,
    RestoreReply,
    RestoreRequest,
)

__all__ = ["CustodyDesk", "backup", "doctor", "restore"]

_SIGNATURE_LABEL = "keys-backup-v1"


class CustodyDesk(AdminDesk):
    """The admin desk, plus `doctor`, `backup` and `restore`."""

    async def _dispatch(self, op: AdminOp, msg: Msg) -> BaseModel:
        if op is AdminOp.doctor:
            request = _parse(msg, DoctorRequest)
            return await doctor(self._keys, actor=request.actor)
        if op is AdminOp.backup:
            request_b = _parse(msg, BackupRequest)
            return BackupReply(document=await backup(self._keys, actor=request_b.actor))
        if op is AdminOp.restore:
            request_r = _parse(msg, RestoreRequest)
            return await restore(self._keys, request_r.document, actor=request_r.actor)
        return await super()._dispatch(op, msg)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _body(document: BackupDocument) -> dict[str, Any]:
    return document.model_dump(mode="json", exclude={"signed_by", "signature"})


async def doctor(keys: KeyService, *, actor: str) -> DoctorReply:
    """Verify custody now, then try every record: what is wrong, and what to do."""
    custody = keys.custody
    await keys.verify_custody(actor=actor)
    status = custody.status
    details = await custody.describe()
    records = [s.record for s in await keys.store.snapshot()]
    stale = 0
    unreadable: list[str] = []
    if status.ok:
        try:
            current = await custody.current_kek_id()
            stale = sum(1 for r in records if r.kek_id != current)
        except KekUnavailableError as exc:
            details["current.error"] = exc.reason
        for record in records:
            try:
                await custody.open(record.envelope, record.wrap_context)
            except (EnvelopeError, KekUnavailableError) as exc:
                unreadable.append(
                    f"{record.key_id} v{record.version}: "
                    + explain(exc, what=f"{record.key_id} v{record.version}")
                )
    if stale:
        details["advice"] = "run `keyveil keys rewrap` to move stale records to the current KEK"
    keys.audit("admin_doctor", actor=actor, detail=Doctor(ok=status.ok, unreadable=len(unreadable)))
    return DoctorReply(
        ok=status.ok and not unreadable,
        reason=status.reason,
        provider=custody.provider.name,
        previous_provider=custody.previous.name if custody.previous else None,
        custody_kek_id=status.custody_kek_id,
        details=details,
        records=len(records),
        stale_records=stale,
        unreadable=unreadable,
    )


async def backup(keys: KeyService, *, actor: str) -> BackupDocument:
    keys.custody.require()
    found = await keys.store.get_custody()
    if found is None:
        raise UnavailableError("the bucket has no custody record", code="kek_unavailable")
    stored = sorted(await keys.store.snapshot(), key=lambda s: s.record.kv_key)
    body: dict[str, Any] = {
        "format": BACKUP_FORMAT,
        "created_at": round(time.time(), 3),
        "kek_provider": keys.custody.provider.name,
        "custody": found[0].model_dump(mode="json"),
        "records": [s.record.model_dump(mode="json") for s in stored],
    }
    signer = keys.custody.ring.current
    unsigned = BackupDocument(**body, signed_by=signer.kek_id, signature="")
    signature = signer.signature(_SIGNATURE_LABEL, _canonical(_body(unsigned)))
    keys.audit(
        "keys_backup", actor=actor, detail=Backup(records=len(stored), signed_by=signer.kek_id)
    )
    return unsigned.model_copy(update={"signature": signature})


async def restore(keys: KeyService, document: BackupDocument, *, actor: str) -> RestoreReply:
    """Check the signature, then write every record that is not in the bucket yet."""
    custody = keys.custody
    if document.format != BACKUP_FORMAT:
        raise BadRequestError(f"not a {BACKUP_FORMAT} document", code="bad_backup")
    try:
        custody_record = CustodyRecord.model_validate(document.custody)
        records = [KeyRecord.model_validate(r) for r in document.records]
    except ValidationError:
        raise BadRequestError("malformed backup document", code="bad_backup") from None
    try:
        seed = await custody.open_custody(custody_record)
    except KekUnavailableError as exc:
        raise UnavailableError(explain(exc, what="the backup"), code="kek_unavailable") from None
    except EnvelopeError as exc:
        keys.audit(
            "keys_restore",
            actor=actor,
            outcome="denied",
            detail=Rejected(reason=KeyRejection.custody),
        )
        raise BadRequestError(
            explain(exc, what="the backup's custody record"), code="bad_backup"
        ) from None
    signer = Kek(seed.hex())
    expected = signer.signature(_SIGNATURE_LABEL, _canonical(_body(document)))
    if signer.kek_id != document.signed_by or not hmac.compare_digest(expected, document.signature):
        keys.audit(
            "keys_restore",
            actor=actor,
            outcome="denied",
            detail=Rejected(reason=KeyRejection.bad_signature),
        )
        raise BadRequestError(
            "the backup signature does not verify: it was changed, or not made under this "
            "key custody",
            code="bad_backup_signature",
        )
    await _restore_custody(keys, custody_record, seed)
    custody.adopt(seed)
    custody.mark(True, f"custody record opens under {custody_record.kek_id}", custody_record.kek_id)
    del seed
    restored = already = 0
    conflicts: list[str] = []
    unreadable: list[str] = []
    for record in records:
        label = f"{record.key_id} v{record.version}"
        try:
            await keys.store.create(record)
            restored += 1
        except ConflictError:
            found = await keys.store.get(record.kv_key)
            if found is not None and found.record == record:
                already += 1
            else:
                conflicts.append(label)
            continue
        try:
            await custody.open(record.envelope, record.wrap_context)
        except (EnvelopeError, KekUnavailableError):
            unreadable.append(label)
    await keys.refresh()
    keys.audit(
        "keys_restore",
        actor=actor,
        detail=Restore(restored=restored, already_present=already, conflicts=len(conflicts)),
    )
    return RestoreReply(
        restored=restored, already_present=already, conflicts=conflicts, unreadable=unreadable
    )


async def _restore_custody(keys: KeyService, record: CustodyRecord, seed: bytes) -> None:
    """Put the backup's custody record in place unless the bucket already shares its seed."""
    found = await keys.store.get_custody()
    if found is None:
        await keys.store.put_custody(record, last=None)
        return
    current, revision = found
    try:
        same = await keys.custody.open_custody(current) == seed
    except (EnvelopeError, KekUnavailableError, ApiError):
        same = False
    if same:
        return
    if await keys.store.snapshot():
        raise ConflictError(
            "the bucket already holds keys under another custody record; "
            "restore into an empty bucket"
        )
    # A fresh bucket got its own custody record at start-up: the backup's replaces it.
    await keys.store.put_custody(record, last=revision)
