"""The key lifecycle: store, rotate with grace, revoke, rewrap, bootstrap, age policy.

Every operation publishes an audit event (who asked, which key id and version, the
outcome) and none carries key material. The in-memory view of records is refreshed
from the bucket; decisions that matter (which version to lease) are confirmed by
reading the record itself, so a revocation made by another replica is honoured at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from services.keymanager import metrics
from services.keymanager.custody import Custody, explain
from services.keymanager.errors import ConflictError, KeyIntegrityError
from services.keymanager.kek import KekUnavailableError, KekUnwrapError
from services.keymanager.records import KeyRecord
from services.keymanager.store import KeyStore, StoredRecord
from shared.crypto import Envelope, EnvelopeError, UnknownKekError
from shared.errors import BadRequestError, NotFoundError, UnavailableError
from shared.events import AuditEvent, EventPublisher
from shared.eventschema import (
    AuditDetail,
    CustodyCreated,
    Kek,
    KekMove,
    KeyRejection,
    KeyRotated,
    Rejected,
    RewrapFailed,
    RotationDue,
)
from shared.keyadmin import KeyInfo, KeyStatus, RewrapReply
from shared.leases import RotatedNotice

__all__ = ["SERVICE", "KeyPolicy", "KeyService"]

log = logging.getLogger(__name__)

SERVICE = "keymanager"
Outcome = Literal["success", "denied", "failure"]
Notifier = Callable[[RotatedNotice], Awaitable[None]]


@dataclass(frozen=True)
class KeyPolicy:
    rotation_grace_s: float
    max_key_age_s: float
    rotation_due_interval_s: float


class KeyService:
    def __init__(
        self,
        *,
        store: KeyStore,
        custody: Custody,
        events: EventPublisher,
        policy: KeyPolicy,
        notify: Notifier,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._custody = custody
        self._keyring = custody.ring
        self._events = events
        self._policy = policy
        self._notify = notify
        self._clock = clock
        self._view: dict[str, StoredRecord] = {}
        self._due_reported: dict[str, float] = {}

    # --- view --------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Merge the bucket's latest records into the view, newest revision winning.

        Records are never deleted, so merging loses nothing; replacing the view would let
        a slower, older snapshot (two lease requests refreshing at once, or a watcher
        cut short by a concurrent write) erase versions this replica has already seen,
        and a lease in the middle of a rotation would then find no key at all.
        """
        for stored in await self._store.snapshot():
            self._remember(stored)

    def _remember(self, stored: StoredRecord) -> None:
        current = self._view.get(stored.record.kv_key)
        if current is None or current.revision < stored.revision:
            self._view[stored.record.kv_key] = stored

    def records(self) -> list[KeyRecord]:
        return [stored.record for stored in self._view.values()]

    def _versions(self, key_id: str) -> list[StoredRecord]:
        found = [s for s in self._view.values() if s.record.key_id == key_id]
        return sorted(found, key=lambda s: s.record.version, reverse=True)

    # --- audit -------------------------------------------------------------------------

    def audit(
        self,
        event_type: str,
        *,
        actor: str,
        outcome: Outcome = "success",
        record: KeyRecord | None = None,
        provider: str | None = None,
        environment: str | None = None,
        detail: AuditDetail | None = None,
    ) -> None:
        self._events.emit(
            AuditEvent(
                service=SERVICE,
                type=event_type,
                actor=actor,
                outcome=outcome,
                key_id=record.key_id if record else None,
                key_version=record.version if record else None,
                provider=record.provider if record else provider,
                environment=record.environment if record else environment,
                detail=detail,
            )
        )

    # --- decrypt -----------------------------------------------------------------------

    @property
    def store(self) -> KeyStore:
        return self._store

    @property
    def custody(self) -> Custody:
        return self._custody

    async def decrypt(self, record: KeyRecord, *, actor: str) -> bytes:
        """The plaintext key, or `KeyIntegrityError` naming the key (and an audit event).

        A KEK provider that cannot be reached (or refuses) is `key_unavailable`: leases fail
        closed once no cached data key is left for the record.
        """
        started = time.perf_counter()
        try:
            plaintext = await self._custody.open(record.envelope, record.wrap_context)
        except KekUnavailableError as exc:
            raise self._kek_unavailable(record, exc, actor=actor) from None
        except (EnvelopeError, ValueError) as exc:
            raise self._integrity_failure(record, exc, actor=actor) from None
        finally:
            metrics.DECRYPT_SECONDS.observe(time.perf_counter() - started)
        return plaintext

    def _kek_unavailable(
        self, record: KeyRecord, exc: KekUnavailableError, *, actor: str
    ) -> UnavailableError:
        log.error(
            "key %s v%d: KEK provider %s unavailable", record.key_id, record.version, exc.provider
        )
        self.audit(
            "kek_unavailable",
            actor=actor,
            outcome="failure",
            record=record,
            detail=Kek(kek_provider=exc.provider, reason=exc.reason[:512]),
        )
        return UnavailableError(
            f"key {record.key_id} v{record.version}: KEK provider {exc.provider} "
            f"unavailable ({exc.reason})",
            code="key_unavailable",
        )

    def _integrity_failure(
        self, record: KeyRecord, exc: Exception, *, actor: str
    ) -> KeyIntegrityError:
        if isinstance(exc, UnknownKekError):
            reason = f"wrapped under unknown KEK version {exc.kek_id}"
            label = KeyRejection.unknown_kek
        elif isinstance(exc, KekUnwrapError):
            reason = f"the KEK provider refused to unwrap: {exc.reason}"
            label = KeyRejection.kek_refused
        elif isinstance(exc, EnvelopeError):
            reason = "authentication failed (tampered ciphertext or wrong associated data)"
            label = KeyRejection.integrity
        else:
            reason, label = "malformed envelope", KeyRejection.malformed
        metrics.INTEGRITY_FAILURES.labels(label).inc()
        log.error("key %s v%d did not decrypt: %s", record.key_id, record.version, label)
        self.audit(
            "decrypt_failed",
            actor=actor,
            outcome="failure",
            record=record,
            detail=Rejected(reason=label),
        )
        return KeyIntegrityError(record.key_id, record.version, reason)

    # --- store and rotate ---------------------------------------------------------------

    async def _new_record(
        self,
        secret: bytes,
        *,
        key_id: str,
        version: int,
        provider: str,
        environment: str,
        actor: str,
    ) -> KeyRecord:
        self._custody.require()
        now = self._clock()
        kek = self._keyring.current
        shell = KeyRecord(
            key_id=key_id,
            provider=provider,
            environment=environment,
            version=version,
            status=KeyStatus.active,
            created_at=now,
            expires_at=now + self._policy.max_key_age_s,
            fingerprint=kek.fingerprint(secret),
            fingerprint_kek=kek.kek_id,
            last4=secret[-4:].decode(errors="replace") if len(secret) >= 12 else "",
            kek_id=kek.kek_id,
            wrapped_key="",
            ciphertext="",
            updated_by=actor,
        )
        try:
            envelope = await self._custody.seal(secret, shell.wrap_context)
        except KekUnavailableError as exc:
            raise UnavailableError(
                f"KEK provider {exc.provider} unavailable ({exc.reason})", code="kek_unavailable"
            ) from None
        return shell.with_envelope(envelope)

    def find_by_fingerprint(self, secret: bytes) -> KeyRecord | None:
        """A stored version holding this key, whichever KEK its fingerprint was made under."""
        prints: dict[str, str] = {}
        for kek_id in self._keyring.kek_ids:
            prints[kek_id] = self._keyring.get(kek_id).fingerprint(secret)
        for record in self.records():
            if prints.get(record.fingerprint_kek) == record.fingerprint:
                return record
        return None

    def active_for(self, provider: str, environment: str) -> KeyRecord | None:
        active = [
            r
            for r in self.records()
            if r.provider == provider
            and r.environment == environment
            and r.status is KeyStatus.active
        ]
        return max(active, key=lambda r: (r.created_at, r.version), default=None)

    async def add(self, secret: bytes, *, provider: str, environment: str, actor: str) -> KeyRecord:
        """Store a new key as the active version 1 of a new key id."""
        _check_secret(secret)
        self._custody.require()
        await self.refresh()
        existing = self.find_by_fingerprint(secret)
        if existing is not None:
            self.audit(
                "key_store",
                actor=actor,
                outcome="denied",
                record=existing,
                detail=Rejected(reason=KeyRejection.duplicate),
            )
            raise ConflictError(f"this key is already stored as {existing.key_id}")
        current = self.active_for(provider, environment)
        if current is not None:
            self.audit(
                "key_store",
                actor=actor,
                outcome="denied",
                record=current,
                detail=Rejected(reason=KeyRejection.active_exists),
            )
            raise ConflictError(
                f"{provider}/{environment} already has active key {current.key_id}; "
                "use `keyveil keys rotate` to replace it"
            )
        # The id is keyed on the key itself, so two replicas importing the same key
        # at once collide on one record instead of storing it twice.
        key_id = "key_" + self._keyring.current.derived_id(f"{provider}|{environment}", secret)
        record = await self._new_record(
            secret,
            key_id=key_id,
            version=1,
            provider=provider,
            environment=environment,
            actor=actor,
        )
        stored = await self._store.create(record)
        self._remember(stored)
        self.audit("key_store", actor=actor, record=record)
        await self._announce(record)
        return record

    async def rotate(
        self, key_id: str, secret: bytes, *, actor: str, grace_s: float | None = None
    ) -> tuple[KeyRecord, list[KeyRecord]]:
        """Store `secret` as the next version (active); live older versions start retiring."""
        _check_secret(secret)
        self._custody.require()
        await self.refresh()
        versions = self._versions(key_id)
        if not versions:
            raise NotFoundError(f"no key {key_id}", code="key_not_found")
        latest = versions[0].record
        existing = self.find_by_fingerprint(secret)
        if existing is not None:
            raise ConflictError(
                f"this key is already stored as {existing.key_id} v{existing.version}"
            )
        record = await self._new_record(
            secret,
            key_id=key_id,
            version=latest.version + 1,
            provider=latest.provider,
            environment=latest.environment,
            actor=actor,
        )
        # The new version exists (active) before any old one stops being active, so a
        # lease asked for in between always finds a key.
        stored = await self._store.create(record)
        self._remember(stored)
        now = self._clock()
        grace = self._policy.rotation_grace_s if grace_s is None else grace_s

        def retire(old: KeyRecord) -> KeyRecord | None:
            if old.status is not KeyStatus.active:
                return None
            return old.model_copy(
                update={
                    "status": KeyStatus.retiring,
                    "rotated_at": now,
                    "retire_at": now + grace,
                    "updated_by": actor,
                }
            )

        retiring: list[KeyRecord] = []
        for old in versions:
            if old.record.status is KeyStatus.active:
                changed = await self._store.mutate(old.record.kv_key, retire)
                if changed is not None:
                    self._remember(changed)
                    retiring.append(changed.record)
        self.audit(
            "key_rotate",
            actor=actor,
            record=record,
            detail=KeyRotated(grace_s=grace, previous_versions=[r.version for r in retiring]),
        )
        await self._announce(record)
        return record, retiring

    async def revoke(
        self, key_id: str, *, actor: str, version: int | None = None
    ) -> list[KeyRecord]:
        """Stop versions at once (every live one when `version` is None)."""
        await self.refresh()
        versions = self._versions(key_id)
        if version is not None:
            versions = [s for s in versions if s.record.version == version]
        if not versions:
            raise NotFoundError(
                f"no key {key_id}" + (f" v{version}" if version else ""), code="key_not_found"
            )
        now = self._clock()

        def stop(old: KeyRecord) -> KeyRecord | None:
            if old.status is KeyStatus.revoked:
                return None
            return old.model_copy(
                update={"status": KeyStatus.revoked, "revoked_at": now, "updated_by": actor}
            )

        revoked: list[KeyRecord] = []
        for stored in versions:
            if stored.record.status in (KeyStatus.revoked, KeyStatus.retired) and version is None:
                continue
            changed = await self._store.mutate(stored.record.kv_key, stop)
            if changed is not None:
                self._remember(changed)
                revoked.append(changed.record)
                self.audit("key_revoke", actor=actor, record=changed.record)
                await self._announce(changed.record)
        return revoked

    async def rewrap(self, *, actor: str) -> RewrapReply:
        """Move every data key (and the custody record) under the current KEK version.

        Within a remote provider the provider rewraps (Vault `rewrap`, KMS `ReEncrypt`), so
        no data key leaves the key-manager or the provider; fingerprints made under an
        older service key move to the current one. Versions that do not open are reported.
        """
        self._custody.require()
        await self.refresh()
        try:
            current_kek = await self._custody.current_kek_id()
            await self._rewrap_custody(actor=actor)
        except KekUnavailableError as exc:
            raise UnavailableError(
                f"KEK provider {exc.provider} unavailable ({exc.reason})", code="kek_unavailable"
            ) from None
        service = self._keyring.current
        rewrapped = already = 0
        failed: list[str] = []
        for stored in list(self._view.values()):
            record = stored.record
            if record.kek_id == current_kek and record.fingerprint_kek == service.kek_id:
                already += 1
                continue
            try:
                envelope = record.envelope
                if record.kek_id != current_kek:
                    envelope = await self._custody.rewrap(envelope, record.wrap_context)
                fingerprint = record.fingerprint
                if record.fingerprint_kek != service.kek_id:
                    plaintext = await self.decrypt(record, actor=actor)
                    fingerprint = service.fingerprint(plaintext)
                    del plaintext
            except (EnvelopeError, KeyIntegrityError, KekUnavailableError, UnavailableError):
                failed.append(f"{record.key_id} v{record.version}")
                continue

            def move(
                old: KeyRecord,
                env: Envelope = envelope,
                fp: str = fingerprint,
                ciphertext: str = record.ciphertext,
                wrapped: str = record.wrapped_key,
            ) -> KeyRecord | None:
                if old.ciphertext != ciphertext or old.wrapped_key != wrapped:
                    return None
                return old.with_envelope(
                    env, fingerprint=fp, fingerprint_kek=service.kek_id, updated_by=actor
                )

            changed = await self._store.mutate(record.kv_key, move)
            if changed is not None and changed.record.kek_id == envelope.kek_id:
                self._remember(changed)
                rewrapped += 1
                self.audit(
                    "key_rewrap",
                    actor=actor,
                    record=changed.record,
                    detail=KekMove(from_kek=record.kek_id, to_kek=envelope.kek_id),
                )
        if failed:
            self.audit(
                "key_rewrap", actor=actor, outcome="failure", detail=RewrapFailed(failed=failed)
            )
        return RewrapReply(
            kek_id=current_kek, rewrapped=rewrapped, already_current=already, failed=failed
        )

    async def _rewrap_custody(self, *, actor: str) -> None:
        for _ in range(3):
            found = await self._store.get_custody()
            if found is None:
                return
            record, revision = found
            moved = await self._custody.rewrap_custody(record, actor=actor)
            if moved is None:
                return
            try:
                await self._store.put_custody(moved, last=revision)
            except ConflictError:
                continue
            self.audit(
                "custody_rewrap",
                actor=actor,
                detail=KekMove(from_kek=record.kek_id, to_kek=moved.kek_id),
            )
            return

    # --- custody verification -----------------------------------------------------------

    async def verify_custody(self, *, actor: str = SERVICE) -> bool:
        """Prove the configured KEK opens this bucket: the custody record, else the newest record.

        A bucket without a custody record gets one, but only when it is empty or its newest
        record opens: a wrong KEK must not be blessed. The result drives `/readyz`, the
        `keyveil_keymanager_kek_ready` gauge and (on every change) an audit event.
        """
        custody = self._custody
        try:
            found = await self._store.get_custody()
            if found is None:
                seed, custody_kek = await self._first_custody(actor=actor)
            else:
                seed = await custody.open_custody(found[0])
                custody_kek = found[0].kek_id
        except (EnvelopeError, KekUnavailableError, ConflictError) as exc:
            kind = "unavailable" if isinstance(exc, KekUnavailableError) else "custody"
            metrics.KEK_ERRORS.labels(custody.provider.name, kind).inc()
            reason = explain(exc, what="the custody record")
            if custody.mark(False, reason):
                log.error("key custody not verified: %s", reason)
                self.audit(
                    "kek_verify",
                    actor=actor,
                    outcome="failure",
                    detail=Kek(kek_provider=custody.provider.name, reason=reason[:512]),
                )
            return False
        custody.adopt(seed)
        del seed
        reason = f"custody record opens under {custody_kek}"
        if custody.mark(True, reason, custody_kek):
            log.info("key custody verified: %s", reason)
            self.audit(
                "kek_verify",
                actor=actor,
                detail=Kek(kek_provider=custody.provider.name, reason=reason[:512]),
            )
        return True

    async def _first_custody(self, *, actor: str) -> tuple[bytes, str]:
        records = [s.record for s in await self._store.snapshot()]
        if records:
            # Records from before custody records existed: the newest must open first.
            newest = max(records, key=lambda r: (r.created_at, r.version))
            await self._custody.open(newest.envelope, newest.wrap_context)
        record, seed = await self._custody.new_custody_record(actor=actor)
        try:
            await self._store.put_custody(record, last=None)
        except ConflictError:
            # Another replica wrote it first: use theirs.
            found = await self._store.get_custody()
            if found is None:
                raise
            return await self._custody.open_custody(found[0]), found[0].kek_id
        self.audit("custody_created", actor=actor, detail=CustodyCreated(kek_id=record.kek_id))
        return seed, record.kek_id

    async def bootstrap(self, secret: bytes, *, provider: str, environment: str) -> KeyRecord:
        """Import OPENAI_API_KEY once: stored as active unless its fingerprint is known."""
        await self.refresh()
        existing = self.find_by_fingerprint(secret)
        if existing is not None:
            log.info("bootstrap key already stored as %s v%d", existing.key_id, existing.version)
            return existing
        current = self.active_for(provider, environment)
        try:
            if current is None:
                record = await self.add(
                    secret, provider=provider, environment=environment, actor=SERVICE
                )
            else:
                record, _ = await self.rotate(current.key_id, secret, actor=SERVICE)
        except ConflictError:
            # Another replica imported it first: that is the outcome we wanted.
            await self.refresh()
            found = self.find_by_fingerprint(secret)
            if found is None:
                raise
            return found
        log.info("bootstrap key imported as %s v%d", record.key_id, record.version)
        self.audit("key_bootstrap", actor=SERVICE, record=record)
        return record

    # --- leasing -----------------------------------------------------------------------

    async def leasable(self, provider: str, environment: str) -> KeyRecord:
        """The version to lease: newest active, else a retiring one still in its grace.

        The candidate is re-read from the bucket, so a status change made by another
        replica a moment ago is honoured; a stale view is refreshed once.
        """
        for attempt in range(2):
            now = self._clock()
            candidates = sorted(
                (
                    r
                    for r in self.records()
                    if r.provider == provider and r.environment == environment and r.leasable(now)
                ),
                key=lambda r: (r.status is KeyStatus.active, r.created_at, r.version),
                reverse=True,
            )
            for candidate in candidates:
                confirmed = await self._store.get(candidate.kv_key)
                if confirmed is None:
                    continue
                self._remember(confirmed)
                if confirmed.record.leasable(now) and (
                    confirmed.record.status is KeyStatus.active or attempt == 1
                ):
                    return confirmed.record
            if attempt == 0:
                await self.refresh()
        raise UnavailableError(
            f"no usable {provider} key for {environment}", code="key_unavailable"
        )

    # --- policy ------------------------------------------------------------------------

    async def enforce_policy(self) -> None:
        """Retire versions past their grace; report keys older than the maximum age."""
        await self.refresh()
        now = self._clock()

        def retire(old: KeyRecord) -> KeyRecord | None:
            if old.status is not KeyStatus.retiring or (old.retire_at or 0.0) > now:
                return None
            return old.model_copy(update={"status": KeyStatus.retired, "updated_by": SERVICE})

        for record in self.records():
            if record.status is KeyStatus.retiring and (record.retire_at or 0.0) <= now:
                changed = await self._store.mutate(record.kv_key, retire)
                if changed is not None and changed.record.status is KeyStatus.retired:
                    self._remember(changed)
                    self.audit("key_retire", actor=SERVICE, record=changed.record)
                    await self._announce(changed.record)
        newest: dict[tuple[str, str], KeyRecord] = {}
        for record in self.records():
            if record.status is not KeyStatus.active:
                continue
            slot = (record.environment, record.provider)
            if slot not in newest or newest[slot].created_at < record.created_at:
                newest[slot] = record
            age = now - record.created_at
            if age > self._policy.max_key_age_s:
                last = self._due_reported.get(record.kv_key)
                if last is None or now - last >= self._policy.rotation_due_interval_s:
                    self._due_reported[record.kv_key] = now
                    self.audit(
                        "rotation_due",
                        actor=SERVICE,
                        outcome="failure",
                        record=record,
                        detail=RotationDue(
                            age_s=round(age), max_age_s=round(self._policy.max_key_age_s)
                        ),
                    )
        for (environment, provider), record in newest.items():
            metrics.KEY_AGE_SECONDS.labels(environment, provider).set(now - record.created_at)

    # --- admin views -------------------------------------------------------------------

    async def list_keys(
        self, *, provider: str | None, environment: str | None, include_retired: bool
    ) -> list[KeyInfo]:
        await self.refresh()
        hidden = () if include_retired else (KeyStatus.retired,)
        chosen = [
            r
            for r in self.records()
            if (provider is None or r.provider == provider)
            and (environment is None or r.environment == environment)
            and r.status not in hidden
        ]
        return _infos(
            sorted(chosen, key=lambda r: (r.provider, r.environment, r.key_id, -r.version))
        )

    async def show(self, key_id: str) -> list[KeyInfo]:
        await self.refresh()
        versions = self._versions(key_id)
        if not versions:
            raise NotFoundError(f"no key {key_id}", code="key_not_found")
        return _infos(s.record for s in versions)

    async def _announce(self, record: KeyRecord) -> None:
        await self._notify(
            RotatedNotice(
                provider=record.provider,
                environment=record.environment,
                key_id=record.key_id,
                version=record.version,
                status=record.status.value,
            )
        )


def _infos(records: Iterable[KeyRecord]) -> list[KeyInfo]:
    return [r.info() for r in records]


def _check_secret(secret: bytes) -> None:
    if not 8 <= len(secret) <= 512 or any(b < 0x21 or b > 0x7E for b in secret):
        raise BadRequestError("a provider key is 8-512 printable characters without spaces")
