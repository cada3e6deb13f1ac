"""The tamper-evident audit ledger: a hash chain over every audit event, in JetStream.

Each record is `{"prev_hash", "hash", "event", ...}` with

    hash = SHA-256(prev_hash || canonical JSON of event)

and the first record chained to `GENESIS_HASH`. The stream denies delete and purge,
and every append carries `Nats-Expected-Last-Sequence`, so two auditor replicas can
never fork the chain: the loser of a race re-reads the head and appends after it.
`Nats-Msg-Id` (the event id) with a long duplicate window makes a redelivered event
append nothing. `verify_chain` walks records in sequence order and names the first
broken link: a changed event, a changed or missing hash, or a gap in the sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    StreamConfig,
)
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.streams import LEDGER_STREAM, LEDGER_SUBJECT

__all__ = [
    "GENESIS_HASH",
    "LEDGER_STREAM",
    "LEDGER_SUBJECT",
    "BrokenLink",
    "Ledger",
    "LedgerRecord",
    "canonical_json",
    "chain_hash",
    "read_stream",
    "verify_chain",
]

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
WRONG_LAST_SEQUENCE = 10071  # JetStream error code for a failed Nats-Expected-Last-Sequence


APPENDS = Counter(
    "keyveil_auditor_ledger_appends_total",
    "Audit ledger appends by result (ok, duplicate, conflict)",
    ["result"],
)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same event always hashes the same."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def chain_hash(prev_hash: str, event: Any) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical_json(event)).hexdigest()


class LedgerRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    prev_hash: str
    hash: str
    event: dict[str, Any]
    appended_at: float
    appended_by: str = ""

    @property
    def event_type(self) -> str:
        return str(self.event.get("type", ""))

    @property
    def event_ts(self) -> float:
        ts = self.event.get("ts")
        return float(ts) if isinstance(ts, int | float) else self.appended_at


@dataclass(frozen=True)
class BrokenLink:
    seq: int
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    first_seq: int
    last_seq: int
    head_hash: str
    broken: BrokenLink | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify_chain(
    records: Iterable[tuple[int, bytes]], *, anchor: str | None = None
) -> VerifyResult:
    """Check `(stream sequence, raw record)` pairs in order; stop at the first broken link.

    `anchor` is the hash the first record must chain to: GENESIS_HASH when the walk
    starts at sequence 1, None to accept whatever the first record claims (a walk that
    starts later, where earlier records are out of reach).
    """
    prev = anchor
    expected_seq: int | None = None
    checked = 0
    first_seq = last_seq = 0
    for seq, raw in records:
        if expected_seq is None:
            first_seq = seq
            if seq == 1 and anchor is None:
                prev = GENESIS_HASH
        elif seq != expected_seq:
            return VerifyResult(
                checked, first_seq, last_seq, prev or "",
                BrokenLink(expected_seq, f"record missing (next present is {seq})"),
            )  # fmt: skip
        try:
            record = LedgerRecord.model_validate_json(raw)
        except ValidationError:
            return VerifyResult(
                checked, first_seq, last_seq, prev or "", BrokenLink(seq, "not a ledger record")
            )
        if prev is not None and record.prev_hash != prev:
            return VerifyResult(
                checked, first_seq, last_seq, prev, BrokenLink(seq, "prev_hash does not match")
            )
        if chain_hash(record.prev_hash, record.event) != record.hash:
            return VerifyResult(
                checked, first_seq, last_seq, prev or "",
                BrokenLink(seq, "hash does not match the record's content"),
            )  # fmt: skip
        prev = record.hash
        expected_seq = seq + 1
        last_seq = seq
        checked += 1
    return VerifyResult(checked, first_seq, last_seq, prev or GENESIS_HASH, None)


async def read_stream(
    js: JetStreamContext,
    stream: str,
    *,
    start_seq: int | None = None,
    start_time: float | None = None,
    follow: bool = False,
    idle_timeout_s: float = 2.0,
) -> AsyncIterator[tuple[int, bytes]]:
    """Yield `(sequence, data)` through an ordered ephemeral consumer (no durable state).

    Without `follow`, stops at the stream's last sequence as of the call.
    """
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if not follow and info.state.messages == 0:
        return
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if start_time is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(start_time, UTC),
        )
    elif start_seq is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start_seq, 1)
        )
    subjects = info.config.subjects or []
    subject = subjects[0] if len(subjects) == 1 else ">"
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout_s)
            except nats.errors.TimeoutError:
                if follow:
                    continue
                return
            seq = msg.metadata.sequence.stream
            yield seq, msg.data
            if not follow and seq >= last:
                return
    finally:
        await sub.unsubscribe()


class Ledger:
    """Appends audit events to the chain; safe with several writers."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        instance: str,
        stream: StreamConfig = LEDGER_STREAM,
        timeout_s: float = 5.0,
        max_attempts: int = 50,
    ) -> None:
        self._js = js
        self._instance = instance
        self._stream = stream
        self._subject = (stream.subjects or [LEDGER_SUBJECT])[0]
        self._timeout = timeout_s
        self._attempts = max_attempts
        self._head: tuple[int, str] | None = None

    @property
    def stream_name(self) -> str:
        return self._stream.name or ""

    async def ensure(self) -> None:
        """Create this ledger's stream where absent: for tests with a stream of their own.
        The auditor never calls it; the real ledger stream comes from `keyveil bootstrap`."""
        try:
            await self._js.stream_info(self.stream_name)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(self._stream)

    async def head(self) -> tuple[int, str]:
        """(last sequence, last hash) as the stream says now."""
        info = await self._js.stream_info(self.stream_name)
        last = info.state.last_seq
        if last == 0 or info.state.messages == 0:
            return last, GENESIS_HASH
        msg = await self._js.get_msg(self.stream_name, seq=last)
        record = LedgerRecord.model_validate_json(msg.data or b"")
        return last, record.hash

    async def append(self, event: dict[str, Any], *, event_id: str) -> int:
        """Chain `event` after the current head; returns its stream sequence."""
        for _ in range(self._attempts):
            if self._head is None:
                self._head = await self.head()
            seq, prev = self._head
            record = LedgerRecord(
                prev_hash=prev,
                hash=chain_hash(prev, event),
                event=event,
                appended_at=time.time(),
                appended_by=self._instance,
            )
            headers = {"Nats-Msg-Id": event_id, "Nats-Expected-Last-Sequence": str(seq)}
            try:
                ack = await self._js.publish(
                    self._subject,
                    record.model_dump_json().encode(),
                    timeout=self._timeout,
                    headers=headers,
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    self._head = None
                    raise
                APPENDS.labels("conflict").inc()
                self._head = None  # another writer appended: re-read the head and retry
                continue
            except Exception:
                self._head = None  # unknown whether it landed; the next append re-reads
                raise
            if ack.duplicate:
                APPENDS.labels("duplicate").inc()
                self._head = None
            else:
                APPENDS.labels("ok").inc()
                self._head = (ack.seq, record.hash)
            return ack.seq
        raise RuntimeError("ledger append kept losing the race for the chain head")
