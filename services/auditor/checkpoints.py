"""Signed checkpoints of the ledger head, kept as files outside NATS.

A checkpoint `{stream, seq, hash, records, ts, key_id, signature}` says "at `ts` the
chain's last genuine record was `seq` with `hash`, and the stream held `records`
records up to it". It is signed with the ledger key and written where no NATS login
can reach, so an attacker who empties, shortens or re-creates the stream cannot also
move the anchor: `keyveil audit verify` compares the stream with the latest
checkpoints and fails on anything missing.

The auditor writes one every `LEDGER_CHECKPOINT_INTERVAL_S`, after verifying the
records since the previous checkpoint (a break means no new checkpoint, and an alert);
files are written atomically (tmp, fsync, rename) and only the latest N are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats.js.errors
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.auditor.ledger import (
    GENESIS_HASH,
    BrokenLink,
    canonical_json,
    fetch_records,
    verify_chain,
)
from services.auditor.ledgerkeys import CHECKPOINT_CONTEXT, LedgerSigner, LedgerVerifier

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "Checkpointer",
    "LoadedCheckpoints",
    "ephemeral_verifier",
    "record_ephemeral_key",
    "sign_checkpoint",
]

EPHEMERAL_KEYS_DIR = "ephemeral-verify-keys"

log = logging.getLogger(__name__)

CHECKPOINTS = Counter(
    "keyveil_auditor_ledger_checkpoints_total",
    "Ledger checkpoint runs by result (written, unchanged, broken, error)",
    ["result"],
)
CHECKPOINT_SEQ = Gauge(
    "keyveil_auditor_ledger_checkpoint_seq", "Ledger sequence of the latest written checkpoint"
)


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stream: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    seq: int = Field(ge=0)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    records: int = Field(ge=0)
    ts: float
    key_id: str
    signature: str

    @property
    def payload(self) -> bytes:
        return canonical_json(self.model_dump(exclude={"signature"}))

    @property
    def first_seq(self) -> int:
        """The stream's first sequence when this checkpoint was taken."""
        return self.seq - self.records + 1

    def verifies(self, verifier: LedgerVerifier) -> bool:
        return verifier.verify(self.key_id, CHECKPOINT_CONTEXT, self.payload, self.signature)


def sign_checkpoint(
    signer: LedgerSigner, *, stream: str, seq: int, hash: str, records: int, ts: float
) -> Checkpoint:
    unsigned = Checkpoint(
        stream=stream, seq=seq, hash=hash, records=records, ts=ts, key_id=signer.key_id,
        signature="",
    )  # fmt: skip
    return unsigned.model_copy(
        update={"signature": signer.sign(CHECKPOINT_CONTEXT, unsigned.payload)}
    )


@dataclass(frozen=True)
class LoadedCheckpoints:
    """The valid checkpoints of one stream (oldest first) and the files that failed."""

    valid: list[Checkpoint] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)

    @property
    def latest(self) -> Checkpoint | None:
        return self.valid[-1] if self.valid else None


class CheckpointStore:
    """`<dir>/<stream>.<seq>.json`, newest `keep` per stream."""

    def __init__(self, directory: Path, *, keep: int = 48) -> None:
        self.directory = directory
        self._keep = keep

    def _files(self, stream: str) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"{stream}.*.json"))

    def write(self, checkpoint: Checkpoint) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{checkpoint.stream}.{checkpoint.seq:015d}.json"
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(checkpoint.model_dump_json(indent=2))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
        with contextlib.suppress(OSError):  # directory fsync is not possible everywhere
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        for old in self._files(checkpoint.stream)[: -self._keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return final

    def load(self, stream: str, verifier: LedgerVerifier) -> LoadedCheckpoints:
        """Every checkpoint file of `stream`; one that is unreadable or unsigned is `invalid`."""
        loaded = LoadedCheckpoints()
        for path in self._files(stream):
            try:
                checkpoint = Checkpoint.model_validate_json(path.read_bytes())
            except (OSError, ValidationError):
                loaded.invalid.append(path.name)
                continue
            if checkpoint.stream != stream or not checkpoint.verifies(verifier):
                loaded.invalid.append(path.name)
                continue
            loaded.valid.append(checkpoint)
        loaded.valid.sort(key=lambda c: c.seq)
        return loaded


def record_ephemeral_key(directory: Path, signer: LedgerSigner) -> Path:
    """Development only: leave a generated key's public half where verify will find it."""
    keys = directory / EPHEMERAL_KEYS_DIR
    keys.mkdir(parents=True, exist_ok=True)
    path = keys / f"{signer.key_id.replace(':', '-')}.pub"
    path.write_text(signer.public_key_b64 + "\n")
    return path


def ephemeral_verifier(directory: Path) -> LedgerVerifier:
    """The public keys development auditors recorded in `directory` (none: empty)."""
    keys = directory / EPHEMERAL_KEYS_DIR
    if not keys.is_dir():
        return LedgerVerifier([])
    return LedgerVerifier.from_strings(p.read_text().strip() for p in sorted(keys.glob("*.pub")))


ProblemHook = Callable[[list[BrokenLink]], None]


class Checkpointer:
    """Verifies what was appended since the last checkpoint, then signs the new head."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        signer: LedgerSigner,
        verifier: LedgerVerifier,
        store: CheckpointStore,
        interval_s: float,
        on_problem: ProblemHook | None = None,
    ) -> None:
        self._js = js
        self._stream = stream
        self._signer = signer
        self._verifier = verifier
        self._store = store
        self._interval = interval_s
        self._on_problem = on_problem
        self._reported: set[tuple[int, str]] = set()

    async def checkpoint_once(self) -> Checkpoint | None:
        """Write a checkpoint of the current genuine head; None when nothing new or broken."""
        loaded = self._store.load(self._stream, self._verifier)
        latest = loaded.latest
        try:
            info = await self._js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            if latest is not None:
                reason = f"the ledger stream is gone; checkpoint seq {latest.seq} vouched for it"
                self._report([BrokenLink(latest.seq, reason, "truncated")])
                CHECKPOINTS.labels("broken").inc()
                return None
            raise
        first = max(info.state.first_seq, 1)
        anchor: str | None
        if latest is not None and latest.seq >= first:
            start, anchor = latest.seq + 1, latest.hash
        else:
            start, anchor = first, (GENESIS_HASH if first == 1 else None)
        if latest is not None and (info.state.last_seq < latest.seq or first > latest.first_seq):
            reason = (
                f"stream (seq {first}..{info.state.last_seq}) is shorter than "
                f"checkpoint seq {latest.seq}"
            )
            self._report([BrokenLink(latest.seq, reason, "truncated")])
            CHECKPOINTS.labels("broken").inc()
            return None
        if latest is None and first > 1:
            # The ledger never legitimately starts late; a first checkpoint would launder it.
            reason = f"truncated: the stream starts at seq {first} and no checkpoint anchors it"
            self._report([BrokenLink(first - 1, reason, "truncated")])
            CHECKPOINTS.labels("broken").inc()
            return None
        if info.state.last_seq < start:
            CHECKPOINTS.labels("unchanged").inc()
            return None
        records = await fetch_records(
            self._js, self._stream, start_seq=start, last_seq=info.state.last_seq
        )
        result = verify_chain(records, verifier=self._verifier, anchor=anchor, start_seq=start)
        if result.problems:
            self._report(list(result.problems))
        chain_stopped = any(
            p.code in ("missing", "prev_hash", "checkpoint") for p in result.problems
        )
        if chain_stopped:
            CHECKPOINTS.labels("broken").inc()
            return None
        if result.head_seq == 0 or (latest is not None and result.head_seq <= latest.seq):
            CHECKPOINTS.labels("unchanged").inc()
            return None
        checkpoint = sign_checkpoint(
            self._signer,
            stream=self._stream,
            seq=result.head_seq,
            hash=result.head_hash,
            records=result.head_seq - first + 1,
            ts=time.time(),
        )
        self._store.write(checkpoint)
        CHECKPOINTS.labels("written").inc()
        CHECKPOINT_SEQ.set(checkpoint.seq)
        return checkpoint

    def _report(self, problems: list[BrokenLink]) -> None:
        fresh = [p for p in problems if (p.seq, p.code) not in self._reported]
        if not fresh:
            return  # one alert per problem, not one per interval
        self._reported.update((p.seq, p.code) for p in fresh)
        if self._on_problem is not None:
            self._on_problem(fresh)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.checkpoint_once()
            except Exception as exc:  # a bus or disk failure: try again next interval
                CHECKPOINTS.labels("error").inc()
                log.warning("ledger checkpoint failed (%s)", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
