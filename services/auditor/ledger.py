"""The tamper-evident audit ledger: a signed hash chain over every audit event, in JetStream.

Each record is `{"v": 2, "prev_hash", "hash", "subject", "event", ..., "key_id", "signature"}`:

    hash      = SHA-256(prev_hash || canonical JSON of {event, subject, appended_at, appended_by})
    signature = Ed25519(RECORD_CONTEXT, canonical JSON of {prev_hash, hash, key_id})

the first record chained to `GENESIS_HASH`. The signing key is held by the auditor
process only (no NATS login has it), so bytes someone else appends to the stream are
*foreign*: the auditor skips them when it looks for the chain head and keeps appending
after the last genuine record, and `verify_chain` reports them without losing the
chain behind them. The stream denies delete and purge, and every append carries
`Nats-Expected-Last-Sequence`, so auditor replicas never fork the chain: the loser of a
race re-reads the head and appends after it. `Nats-Msg-Id` (the event id) with a long
duplicate window makes a redelivered event append nothing.

What `verify_chain` reports (`BrokenLink.code`, stable):

    missing            a sequence gap (a record gone)                    chain stops
    prev_hash          a genuine record not chained to the one before   chain stops
    foreign            not a record, unknown key, bad signature, or
                       content that does not match its hash               skipped
    wrong_publisher    a genuine record whose event its subject's
                       publisher may not emit (services/auditor/publishers.py)
    checkpoint         a signed checkpoint's (seq, hash) not in the chain
    truncated          (from the checkpoint comparison in `keyveil audit verify` and the
                       Checkpointer) the stream starts late, ends early, is empty or gone

Known limit: the auditor's own NATS login can re-publish a byte copy of a genuine
record. Verify reports it (its prev_hash does not match), but the auditor, which takes
the last genuine record as the head, may chain after the copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    StreamConfig,
)
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.auditor.ledgerkeys import RECORD_CONTEXT, LedgerSigner, LedgerVerifier
from services.auditor.publishers import publisher_mismatch
from shared.streams import LEDGER_STREAM, LEDGER_SUBJECT

__all__ = [
    "GENESIS_HASH",
    "LEDGER_STREAM",
    "LEDGER_SUBJECT",
    "BrokenLink",
    "Ledger",
    "LedgerRecord",
    "VerifyResult",
    "canonical_json",
    "chain_hash",
    "fetch_records",
    "genuine_record",
    "parse_record",
    "read_stream",
    "verify_chain",
]

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
WRONG_LAST_SEQUENCE = 10071  # JetStream error code for a failed Nats-Expected-Last-Sequence
MAX_REPORTED = 100  # problems listed per walk; the rest are only counted


APPENDS = Counter(
    "keyveil_auditor_ledger_appends_total",
    "Audit ledger appends by result (ok, duplicate, conflict)",
    ["result"],
)
FOREIGN_AT_HEAD = Counter(
    "keyveil_auditor_ledger_foreign_skipped_total",
    "Foreign (unsigned or invalid) records skipped while finding the ledger head",
)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same event always hashes the same."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def chain_hash(prev_hash: str, content: Any) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical_json(content)).hexdigest()


_HEX64 = r"^[0-9a-f]{64}$"


class LedgerRecord(BaseModel):
    """One ledger entry; `content` is what the hash covers, `signed_payload` what is signed."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[2]
    prev_hash: str = Field(pattern=_HEX64)
    hash: str = Field(pattern=_HEX64)
    subject: str
    event: dict[str, Any]
    appended_at: float
    appended_by: str = ""
    key_id: str
    signature: str

    @staticmethod
    def content_of(
        event: Mapping[str, Any], *, subject: str, appended_at: float, appended_by: str
    ) -> dict[str, Any]:
        return {
            "event": dict(event),
            "subject": subject,
            "appended_at": appended_at,
            "appended_by": appended_by,
        }

    @property
    def content(self) -> dict[str, Any]:
        return self.content_of(
            self.event,
            subject=self.subject,
            appended_at=self.appended_at,
            appended_by=self.appended_by,
        )

    @staticmethod
    def signed_payload_of(prev_hash: str, digest: str, key_id: str) -> bytes:
        return canonical_json({"prev_hash": prev_hash, "hash": digest, "key_id": key_id})

    @classmethod
    def build(
        cls,
        signer: LedgerSigner,
        *,
        prev_hash: str,
        event: Mapping[str, Any],
        subject: str,
        appended_by: str,
        appended_at: float | None = None,
    ) -> LedgerRecord:
        when = time.time() if appended_at is None else appended_at
        content = cls.content_of(event, subject=subject, appended_at=when, appended_by=appended_by)
        digest = chain_hash(prev_hash, content)
        payload = cls.signed_payload_of(prev_hash, digest, signer.key_id)
        return cls(
            v=2,
            prev_hash=prev_hash,
            hash=digest,
            subject=subject,
            event=dict(event),
            appended_at=when,
            appended_by=appended_by,
            key_id=signer.key_id,
            signature=signer.sign(RECORD_CONTEXT, payload),
        )

    @property
    def event_type(self) -> str:
        return str(self.event.get("type", ""))

    @property
    def event_ts(self) -> float:
        ts = self.event.get("ts")
        return float(ts) if isinstance(ts, int | float) else self.appended_at


def parse_record(raw: bytes) -> LedgerRecord | None:
    """The record in `raw`, or None when it is not shaped like one."""
    try:
        return LedgerRecord.model_validate(json.loads(raw))
    except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError are both
        return None


def genuine_record(raw: bytes, verifier: LedgerVerifier) -> tuple[LedgerRecord | None, str]:
    """(record, "") when `raw` is a record our keys signed and its content matches its hash;
    else (None, why)."""
    record = parse_record(raw)
    if record is None:
        return None, "not a ledger record"
    payload = LedgerRecord.signed_payload_of(record.prev_hash, record.hash, record.key_id)
    if record.key_id not in verifier.key_ids:
        return None, "signed by an unknown key"
    if not verifier.verify(record.key_id, RECORD_CONTEXT, payload, record.signature):
        return None, "signature does not verify"
    try:
        digest = chain_hash(record.prev_hash, record.content)
    except ValueError:  # NaN or infinity in the event: never written by an auditor
        return None, "hash does not match the record's content"
    if digest != record.hash:
        return None, "hash does not match the record's content"
    return record, ""


@dataclass(frozen=True)
class BrokenLink:
    seq: int
    reason: str
    code: str = "broken"


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    first_seq: int
    last_seq: int
    head_hash: str
    problems: tuple[BrokenLink, ...] = ()
    head_seq: int = 0  # the last genuine record's sequence (0: none)
    problem_count: int = 0  # problems found, including those beyond MAX_REPORTED

    @property
    def broken(self) -> BrokenLink | None:
        """The first problem in sequence order, or None when the chain verified."""
        return self.problems[0] if self.problems else None

    @property
    def ok(self) -> bool:
        return not self.problems

    def of_code(self, code: str) -> list[BrokenLink]:
        return [p for p in self.problems if p.code == code]


@dataclass
class _Walk:
    problems: list[BrokenLink] = field(default_factory=list)
    count: int = 0

    def add(self, seq: int, reason: str, code: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(BrokenLink(seq, reason, code))


def verify_chain(
    records: Iterable[tuple[int, bytes]],
    *,
    verifier: LedgerVerifier,
    anchor: str | None = None,
    start_seq: int | None = None,
    expect: Mapping[int, str] | None = None,
) -> VerifyResult:
    """Check `(stream sequence, raw record)` pairs in order.

    `anchor` is the hash the first genuine record must chain to: GENESIS_HASH when the
    walk starts at sequence 1, a checkpoint's hash when it starts after one, None to
    accept whatever the first record claims. `start_seq`, when given, is the sequence
    the walk must begin at. `expect` maps sequences to the hash signed checkpoints say
    they have. Foreign records are reported and skipped; a gap or a genuine record
    that does not chain stops the walk.
    """
    walk = _Walk()
    prev = anchor
    expected_seq = start_seq
    expect = dict(expect or {})
    checked = 0
    first_seq = last_seq = head_seq = 0
    started = False
    for seq, raw in records:
        if not started:
            first_seq = seq
            started = True
            if prev is None and seq == 1:
                prev = GENESIS_HASH
        if expected_seq is not None and seq != expected_seq:
            walk.add(expected_seq, f"record missing (next present is {seq})", "missing")
            break
        expected_seq = seq + 1
        last_seq = seq
        record, why = genuine_record(raw, verifier)
        want = expect.pop(seq, None)
        if record is None:
            walk.add(seq, f"foreign record: {why}", "foreign")
            if want is not None:
                walk.add(seq, "a checkpoint's record is not a genuine record", "checkpoint")
            continue
        if prev is not None and record.prev_hash != prev:
            walk.add(seq, "prev_hash does not match", "prev_hash")
            break
        if want is not None and want != record.hash:
            walk.add(seq, "hash differs from the signed checkpoint's", "checkpoint")
            break
        mismatch = publisher_mismatch(record.subject, record.event)
        if mismatch is not None:
            walk.add(seq, f"wrong publisher: {mismatch.reason}", "wrong_publisher")
        prev = record.hash
        head_seq = seq
        checked += 1
    else:
        for seq in sorted(expect):
            walk.add(seq, "a checkpoint's record is not in the chain", "checkpoint")
    return VerifyResult(
        checked=checked,
        first_seq=first_seq,
        last_seq=last_seq,
        head_hash=prev or GENESIS_HASH,
        problems=tuple(sorted(walk.problems, key=lambda p: p.seq)),
        head_seq=head_seq,
        problem_count=walk.count,
    )


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


async def fetch_records(
    js: JetStreamContext, stream: str, *, start_seq: int, last_seq: int
) -> list[tuple[int, bytes]]:
    """`(sequence, data)` for `start_seq..last_seq` by direct message gets (a missing one is
    left out, so the gap shows). The auditor's login may get ledger messages but not make
    consumers on the ledger, so this is how the auditor itself reads it back."""
    found: list[tuple[int, bytes]] = []
    for seq in range(max(start_seq, 1), last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        found.append((seq, msg.data or b""))
    return found


class Ledger:
    """Appends signed audit records to the chain; safe with several writers."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        instance: str,
        signer: LedgerSigner,
        verifier: LedgerVerifier | None = None,
        stream: StreamConfig = LEDGER_STREAM,
        timeout_s: float = 5.0,
        max_attempts: int = 50,
    ) -> None:
        self._js = js
        self._instance = instance
        self._signer = signer
        # Our own key plus earlier ones: a head written before a key rotation is genuine.
        self.verifier = (
            signer.verifier() if verifier is None else signer.verifier().merged(verifier)
        )
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
        """(last sequence, hash of the last genuine record) as the stream says now.

        Walks back over foreign records (anything our keys did not sign), so one
        injected message cannot stop the ledger: the next record chains to the last
        genuine one, and the foreign record stays where it is for `verify` to report.
        """
        info = await self._js.stream_info(self.stream_name)
        last, first = info.state.last_seq, max(info.state.first_seq, 1)
        if last == 0 or info.state.messages == 0:
            return last, GENESIS_HASH
        skipped = 0
        for seq in range(last, first - 1, -1):
            try:
                msg = await self._js.get_msg(self.stream_name, seq=seq)
            except nats.js.errors.NotFoundError:
                continue
            record, why = genuine_record(msg.data or b"", self.verifier)
            if record is not None:
                if skipped:
                    log.warning(
                        "ledger head: skipped %d foreign record(s) after seq %d", skipped, seq
                    )
                return last, record.hash
            skipped += 1
            FOREIGN_AT_HEAD.inc()
            log.warning("ledger seq %d is a foreign record (%s); skipping it", seq, why)
        return last, GENESIS_HASH

    async def append(self, event: dict[str, Any], *, event_id: str, subject: str) -> int:
        """Chain `event` (as published on `subject`) after the head; returns its sequence."""
        for _ in range(self._attempts):
            if self._head is None:
                self._head = await self.head()
            seq, prev = self._head
            record = LedgerRecord.build(
                self._signer,
                prev_hash=prev,
                event=event,
                subject=subject,
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
