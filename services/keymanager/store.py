"""Key records in a JetStream KV bucket: one entry per key version, changed only by CAS.

Every write names the revision it read (`create` = revision 0), so two key-manager
replicas changing the same record never overwrite each other: the loser re-reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from services.keymanager.custody import CUSTODY_KEY, CustodyRecord
from services.keymanager.errors import ConflictError
from services.keymanager.records import KeyRecord
from shared.streams import keys_bucket_config

__all__ = ["KeyStore", "StoredRecord"]

log = logging.getLogger(__name__)

_KV_DELETE_OPS = ("DEL", "PURGE")
_META_PREFIX = "meta."


class StoredRecord(NamedTuple):
    record: KeyRecord
    revision: int


class KeyStore:
    """The bucket, opened at start-up (created by `keyveil bootstrap`, or here if absent:
    the key-manager owns it; it may create it, never update or delete it)."""

    def __init__(self, js: JetStreamContext, *, bucket: str, replicas: int, history: int) -> None:
        self._js = js
        self._config = keys_bucket_config(bucket=bucket, replicas=replicas, history=history)
        self._kv: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("KeyStore.open() was not awaited")
        return self._kv

    async def open(self) -> None:
        try:
            self._kv = await self._js.key_value(self._config.bucket)
        except nats.js.errors.BucketNotFoundError:
            # Two replicas may race here; creating an identical stream is idempotent.
            self._kv = await self._js.create_key_value(self._config)

    async def snapshot(self) -> list[StoredRecord]:
        """The latest revision of every record (one ordered consumer, then stopped)."""
        watcher = await self.kv.watchall()
        found: list[StoredRecord] = []
        try:
            while True:
                entry = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
                if entry is None:
                    break
                deleted = entry.operation in _KV_DELETE_OPS or entry.value is None
                if not deleted and not entry.key.startswith(_META_PREFIX):
                    parsed = self._parse(entry.key, entry.value or b"", entry.revision or 0)
                    if parsed is not None:
                        found.append(parsed)
                if not entry.delta:
                    break
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return found

    async def get(self, key: str) -> StoredRecord | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return self._parse(key, entry.value, entry.revision or 0)

    async def create(self, record: KeyRecord) -> StoredRecord:
        try:
            revision = await self.kv.create(record.kv_key, record.model_dump_json().encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError(f"key {record.key_id} v{record.version} already exists") from None
        return StoredRecord(record, revision)

    async def update(self, stored: StoredRecord, record: KeyRecord) -> StoredRecord:
        """Replace `stored` with `record` only if nobody wrote it since it was read."""
        try:
            revision = await self.kv.update(
                record.kv_key, record.model_dump_json().encode(), last=stored.revision
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError(
                f"key {record.key_id} v{record.version} changed concurrently"
            ) from None
        return StoredRecord(record, revision)

    async def mutate(
        self,
        key: str,
        change: Callable[[KeyRecord], KeyRecord | None],
        *,
        attempts: int = 5,
    ) -> StoredRecord | None:
        """Read, apply `change`, write with CAS; re-read and retry when another writer won.

        `change` returns None when there is nothing to do (then nothing is written).
        """
        for _ in range(attempts):
            stored = await self.get(key)
            if stored is None:
                return None
            changed = change(stored.record)
            if changed is None:
                return stored
            try:
                return await self.update(stored, changed)
            except ConflictError:
                continue
        raise ConflictError(f"record {key} kept changing; try again")

    # --- the custody record (see custody.py) --------------------------------------------

    async def get_custody(self) -> tuple[CustodyRecord, int] | None:
        try:
            entry = await self.kv.get(CUSTODY_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        try:
            return CustodyRecord.model_validate_json(entry.value), entry.revision or 0
        except ValidationError:
            log.error("unreadable custody record (revision %d)", entry.revision or 0)
            return None

    async def put_custody(self, record: CustodyRecord, *, last: int | None) -> int:
        """Create (`last` None) or replace by CAS; ConflictError when another writer won."""
        value = record.model_dump_json().encode()
        try:
            if last is None:
                return await self.kv.create(CUSTODY_KEY, value)
            return await self.kv.update(CUSTODY_KEY, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError("the custody record changed concurrently") from None

    @staticmethod
    def _parse(key: str, value: bytes, revision: int) -> StoredRecord | None:
        try:
            return StoredRecord(KeyRecord.model_validate_json(value), revision)
        except ValidationError:
            log.error("unreadable key record %s (revision %d) ignored", key, revision)
            return None
