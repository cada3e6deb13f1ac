"""Attacks on the ledger against a real JetStream: a foreign record, truncation, a deleted
or replaced head, an emptied or deleted stream, a record from the wrong publisher, a
tampered checkpoint. `keyveil audit verify` must catch each; none may stop the ledger.

Truncation needs a stream that allows it: `UNPROTECTED` is the ledger's own config
minus deny_delete/deny_purge, standing in for what a STREAM.UPDATE (max_msgs, max_age)
or a re-created stream does to the real one."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from keyveil import cli
from keyveil.commands.audit import verify_ledger
from keyveil.servers import ServerProcess
from services.auditor.checkpoints import Checkpointer, CheckpointStore, sign_checkpoint
from services.auditor.ledger import (
    GENESIS_HASH,
    LEDGER_STREAM,
    LEDGER_SUBJECT,
    BrokenLink,
    LedgerRecord,
    VerifyResult,
    genuine_record,
)
from services.auditor.ledgerkeys import LedgerSigner, LedgerVerifier
from tests.services.auditor.helpers import KM_SUBJECT, SIGNER, VERIFIER, ledger

UNPROTECTED = replace(
    LEDGER_STREAM,
    name="TEST_LEDGER",
    subjects=["test.ledger.audit"],
    deny_delete=False,
    deny_purge=False,
)
# What the key-manager's reply-subject injection appended: a lease error reply.
INJECTED = b'{"error":{"code":"bad_request","message":"not a lease request"}}'


def km_event(n: int, **fields: object) -> dict[str, object]:
    event: dict[str, object] = {
        "event_id": f"ev-{n}",
        "service": "keymanager",
        "type": "lease_granted",
        "actor": "proxy",
        "outcome": "success",
        "key_id": "key-openai-1",
        "ts": 1_700_000_000 + n,
    }
    event.update(fields)
    return event


async def fill(nc: NATS, count: int, *, start: int = 1, stream: StreamConfig = UNPROTECTED) -> None:
    writer = ledger(nc, stream=stream)
    await writer.ensure()
    for n in range(start, start + count):
        await writer.append(km_event(n), event_id=f"ev-{n}", subject=KM_SUBJECT)


def checkpointer(nc: NATS, store: CheckpointStore, problems: list[BrokenLink]) -> Checkpointer:
    return Checkpointer(
        nc.jetstream(),
        stream=UNPROTECTED.name or "",
        signer=SIGNER,
        verifier=VERIFIER,
        store=store,
        interval_s=60,
        on_problem=problems.extend,
    )


async def verify(
    nc: NATS, store: CheckpointStore | None = None, stream: str = "TEST_LEDGER"
) -> VerifyResult:
    loaded = store.load(stream, VERIFIER) if store is not None else None
    return await verify_ledger(nc.jetstream(), stream, verifier=VERIFIER, checkpoints=loaded)


# --- signatures ------------------------------------------------------------------------


def test_signatures_verify_with_the_public_key_only() -> None:
    record = LedgerRecord.build(
        SIGNER, prev_hash=GENESIS_HASH, event=km_event(1), subject=KM_SUBJECT, appended_by="t"
    )
    raw = record.model_dump_json().encode()
    public_only = LedgerVerifier.from_strings([SIGNER.public_key_b64])
    assert genuine_record(raw, public_only) == (record, "")

    stranger = LedgerSigner.generate()
    assert genuine_record(raw, stranger.verifier()) == (None, "signed by an unknown key")

    data = json.loads(raw)
    data["signature"] = stranger.sign(b"keyveil.ledger.record.v2", b"x")
    assert genuine_record(json.dumps(data).encode(), public_only)[1] == (
        "signature does not verify"
    )
    # A forger with its own key claiming ours.
    forged = LedgerRecord.build(
        stranger, prev_hash=GENESIS_HASH, event=km_event(1), subject=KM_SUBJECT, appended_by="t"
    )
    claimed = forged.model_copy(update={"key_id": SIGNER.key_id}).model_dump_json().encode()
    assert genuine_record(claimed, public_only)[1] == "signature does not verify"
    # Signed content changed after the fact.
    data = json.loads(raw)
    data["event"]["outcome"] = "denied"
    assert genuine_record(json.dumps(data).encode(), public_only)[1] == (
        "hash does not match the record's content"
    )
    data = json.loads(raw)
    data["subject"] = "keyveil.audit.token"
    assert genuine_record(json.dumps(data).encode(), public_only)[1] == (
        "hash does not match the record's content"
    )
    assert genuine_record(INJECTED, public_only) == (None, "not a ledger record")


# --- foreign records -------------------------------------------------------------------


async def test_ledger_keeps_appending_after_a_foreign_record(
    pnc: NATS, private_nats: ServerProcess, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    writer = ledger(pnc)
    await writer.ensure()
    for n in (1, 2, 3):
        await writer.append(km_event(n), event_id=f"ev-{n}", subject=KM_SUBJECT)
    js = pnc.jetstream()
    await js.publish(LEDGER_SUBJECT, INJECTED)  # seq 4, as the injection did
    # The writer still thinks seq 3 is the head: the conflict makes it re-read and skip.
    assert await writer.append(km_event(5), event_id="ev-5", subject=KM_SUBJECT) == 5
    stranger = LedgerSigner.generate()
    lookalike = LedgerRecord.build(
        stranger, prev_hash=GENESIS_HASH, event=km_event(6), subject=KM_SUBJECT, appended_by="x"
    )
    await js.publish(LEDGER_SUBJECT, lookalike.model_dump_json().encode())  # seq 6
    # A restarted auditor (no cached head) walks back over the foreign records.
    restarted = ledger(pnc)
    fifth = await js.get_msg("KEYVEIL_AUDIT_LEDGER", 5)
    assert await restarted.head() == (6, json.loads(fifth.data or b"")["hash"])
    assert await restarted.append(km_event(7), event_id="ev-7", subject=KM_SUBJECT) == 7

    result = await verify(pnc, stream="KEYVEIL_AUDIT_LEDGER")
    assert [(p.seq, p.code) for p in result.problems] == [(4, "foreign"), (6, "foreign")]
    assert result.problems[1].reason == "foreign record: signed by an unknown key"
    assert (result.checked, result.head_seq) == (5, 7)  # the chain around them is whole

    monkeypatch.setenv("NATS_URL", private_nats.url)
    monkeypatch.setenv("LEDGER_VERIFY_KEY", SIGNER.public_key_b64)
    monkeypatch.delenv("LEDGER_CHECKPOINT_DIR", raising=False)
    assert await asyncio.to_thread(cli.main, ["audit", "verify"]) == 1
    out = capsys.readouterr().out.strip()
    assert out == (
        "BROKEN at seq 4: foreign record: not a ledger record "
        "(5 genuine records verified; 2 problems in all)"
    )
    # Once investigated, the injected records need not fail every later verify...
    assert await asyncio.to_thread(cli.main, ["audit", "verify", "--accept-foreign", "4"]) == 1
    assert "BROKEN at seq 6" in capsys.readouterr().out
    accepted = ["audit", "verify", "--accept-foreign", "4", "--accept-foreign", "6"]
    assert await asyncio.to_thread(cli.main, accepted) == 0
    assert "accepted foreign record(s) at seq 4, 6" in capsys.readouterr().out


# --- truncation, deleted head, emptied ledger -----------------------------------------


async def test_verify_catches_truncation_from_the_front(pnc: NATS, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp")
    await fill(pnc, 6)
    written = await checkpointer(pnc, store, []).checkpoint_once()
    assert written is not None
    assert (written.seq, written.records) == (6, 6)
    assert (await verify(pnc, store)).ok

    await pnc.jetstream().purge_stream("TEST_LEDGER", seq=4)  # records 1..3 gone
    result = await verify(pnc, store)
    assert result.broken is not None
    assert result.broken.code == "truncated"
    assert "starts at seq 4" in result.broken.reason
    # Without checkpoints the late start alone is enough...
    unanchored = await verify(pnc)
    assert unanchored.broken is not None
    assert "no checkpoint anchors it" in unanchored.broken.reason
    # ...and a first checkpoint taken now would not launder it.
    problems: list[BrokenLink] = []
    fresh = CheckpointStore(tmp_path / "fresh")
    assert await checkpointer(pnc, fresh, problems).checkpoint_once() is None
    assert [(p.seq, p.code) for p in problems] == [(3, "truncated")]
    assert fresh.load("TEST_LEDGER", VERIFIER).valid == []


async def test_verify_catches_a_deleted_head(pnc: NATS, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp")
    await fill(pnc, 6)
    assert await checkpointer(pnc, store, []).checkpoint_once() is not None
    js = pnc.jetstream()
    # Re-created shorter: a valid chain of 4 records, which only the checkpoint contradicts.
    await js.delete_stream("TEST_LEDGER")
    await fill(pnc, 4)
    assert (await verify(pnc)).ok
    result = await verify(pnc, store)
    assert result.broken == BrokenLink(
        5, "head deleted: the stream ends at seq 4, checkpoint vouched for seq 6", "truncated"
    )
    # Re-created as long, with other content: the checkpointed hash is not in the chain.
    await js.delete_stream("TEST_LEDGER")
    await fill(pnc, 6, start=100)
    replaced = await verify(pnc, store)
    assert replaced.broken is not None
    assert (replaced.broken.seq, replaced.broken.code) == (6, "checkpoint")
    # The head message itself deleted.
    await js.delete_stream("TEST_LEDGER")
    await fill(pnc, 6)
    await js.delete_msg("TEST_LEDGER", 6)
    deleted = await verify(pnc, store)
    assert deleted.broken is not None
    assert (deleted.broken.seq, deleted.broken.code) == (6, "checkpoint")


async def test_verify_catches_an_emptied_or_deleted_ledger(
    pnc: NATS, private_nats: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    store = CheckpointStore(tmp_path / "cp")
    await fill(pnc, 3)
    assert await checkpointer(pnc, store, []).checkpoint_once() is not None
    js = pnc.jetstream()
    await js.purge_stream("TEST_LEDGER")
    emptied = await verify(pnc, store)
    assert emptied.broken is not None
    assert emptied.broken.reason == "the ledger is empty; checkpoint seq 3 vouched for 3 records"
    # No checkpoint: an emptied ledger is still not "ok: 0 records".
    bare = await verify(pnc)
    assert bare.broken is not None
    assert bare.broken.reason == "the ledger is empty but 3 records were appended"

    monkeypatch.setenv("NATS_URL", private_nats.url)
    monkeypatch.setenv("LEDGER_VERIFY_KEY", SIGNER.public_key_b64)
    argv = ["audit", "verify", "--stream", "TEST_LEDGER", "--checkpoint-dir", str(store.directory)]
    assert await asyncio.to_thread(cli.main, argv) == 1
    assert capsys.readouterr().out.startswith("BROKEN at seq 3: the ledger is empty")

    await js.delete_stream("TEST_LEDGER")
    gone = await verify(pnc, store)
    assert gone.broken is not None
    assert gone.broken.reason.startswith("the ledger stream is gone")
    assert await asyncio.to_thread(cli.main, argv) == 1
    # A fresh, never-used ledger with no checkpoint is fine, and says it is empty.
    await fill(pnc, 0)
    fresh = await verify(pnc)
    assert fresh.ok
    assert fresh.checked == 0


# --- publishers --------------------------------------------------------------------------


async def test_verify_catches_a_record_from_the_wrong_publisher(pnc: NATS) -> None:
    writer = ledger(pnc, stream=UNPROTECTED)
    await writer.ensure()
    await writer.append(km_event(1), event_id="ev-1", subject=KM_SUBJECT)
    # What the token login wrote: a key_rotate claiming to be the key-manager's.
    rotate = km_event(2, type="key_rotate", actor="keymanager")
    await writer.append(rotate, event_id="ev-2", subject="keyveil.audit.token")
    await writer.append(
        km_event(3, service="token", type="key_rotate"), event_id="ev-3",
        subject="keyveil.audit.token",
    )  # fmt: skip
    await writer.append(km_event(4), event_id="ev-4", subject=KM_SUBJECT)
    result = await verify(pnc)
    assert [(p.seq, p.code) for p in result.problems] == [
        (2, "wrong_publisher"),
        (3, "wrong_publisher"),
    ]
    assert result.problems[0].reason == (
        "wrong publisher: event says service keymanager but came from token"
    )
    assert result.problems[1].reason == "wrong publisher: token may not emit key_rotate"
    assert result.checked == 4


# --- checkpoints -------------------------------------------------------------------------


async def test_checkpoints_are_signed_atomic_and_pruned(pnc: NATS, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp", keep=3)
    for seq in range(1, 6):
        store.write(
            sign_checkpoint(
                SIGNER, stream="TEST_LEDGER", seq=seq, hash=f"{seq:064x}", records=seq, ts=1.0
            )
        )
    names = sorted(p.name for p in store.directory.iterdir())
    assert names == [f"TEST_LEDGER.{seq:015d}.json" for seq in (3, 4, 5)]  # no tmp files left
    loaded = store.load("TEST_LEDGER", LedgerVerifier.from_strings([SIGNER.public_key_b64]))
    assert [c.seq for c in loaded.valid] == [3, 4, 5]
    assert loaded.invalid == []
    assert store.load("OTHER", VERIFIER).valid == []

    # Someone with the disk but not the key moves the anchor back.
    latest = store.directory / names[-1]
    data = json.loads(latest.read_text())
    data["seq"] = 2
    latest.write_text(json.dumps(data))
    tampered = store.load("TEST_LEDGER", VERIFIER)
    assert tampered.invalid == [names[-1]]
    await fill(pnc, 2)
    result = await verify(pnc, store)
    assert result.broken is not None
    assert result.broken.code == "checkpoint"
    assert names[-1] in result.broken.reason


async def test_checkpointer_vouches_only_for_a_verified_chain(pnc: NATS, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp")
    problems: list[BrokenLink] = []
    writer = checkpointer(pnc, store, problems)
    await fill(pnc, 3)
    first = await writer.checkpoint_once()
    assert first is not None
    assert first.seq == 3
    assert await writer.checkpoint_once() is None  # nothing new: no new file
    assert len(list(store.directory.glob("*.json"))) == 1

    # A foreign record is reported once, and the genuine head after it is checkpointed.
    await pnc.jetstream().publish("test.ledger.audit", INJECTED)
    await fill(pnc, 1, start=5)
    second = await writer.checkpoint_once()
    assert second is not None
    assert second.seq == 5
    assert [(p.seq, p.code) for p in problems] == [(4, "foreign")]

    # The stream replaced under it: no checkpoint vouches for that, and one alert only.
    problems.clear()
    await pnc.jetstream().delete_stream("TEST_LEDGER")
    await fill(pnc, 8, start=200)
    assert await writer.checkpoint_once() is None
    assert [(p.seq, p.code) for p in problems] == [(6, "prev_hash")]
    assert await writer.checkpoint_once() is None
    assert len(problems) == 1
    assert store.load("TEST_LEDGER", VERIFIER).latest == second
    # Deleted outright: reported too, not just a failed run.
    await pnc.jetstream().delete_stream("TEST_LEDGER")
    assert await writer.checkpoint_once() is None
    assert [p.code for p in problems] == ["prev_hash", "truncated"]
    assert problems[-1].reason.startswith("the ledger stream is gone")
