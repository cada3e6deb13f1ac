"""The signed hash-chained ledger on a real JetStream: appends chain, writers never fork
it, and `keyveil audit verify` finds the first forged, re-hashed or missing record."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from keyveil import cli
from keyveil.commands.audit import accept_foreign, verify_ledger
from keyveil.servers import ServerProcess
from services.auditor.ledger import (
    GENESIS_HASH,
    LEDGER_STREAM,
    Ledger,
    LedgerRecord,
    chain_hash,
    read_stream,
    verify_chain,
)
from tests.services.auditor.helpers import KM_SUBJECT, SIGNER, VERIFIER, ledger


def audit_event(n: int) -> dict[str, object]:
    return {
        "event_id": f"ev-{n}",
        "service": "keymanager",
        "type": "lease_granted",
        "actor": "proxy",
        "outcome": "success",
        "key_id": "key-openai-1",
        "ts": 1_700_000_000 + n,
        "detail": {"n": n, "note": "ünïcode"},
    }


async def fill(ledger: Ledger, count: int) -> None:
    for n in range(1, count + 1):
        await ledger.append(audit_event(n), event_id=f"ev-{n}", subject=KM_SUBJECT)


async def records(nc: NATS, stream: str) -> list[tuple[int, bytes]]:
    return [item async for item in read_stream(nc.jetstream(), stream)]


async def copy_stream(nc: NATS, source: str, target: str, edit: dict[int, bytes | None]) -> None:
    """Copy every record into an unprotected stream, replacing (or dropping, None) some."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=target, subjects=[f"forged.{target}"]))
    for seq, raw in await records(nc, source):
        data = edit.get(seq, raw)
        if data is None:
            # Keep sequence numbers honest about the gap: publish, then delete it.
            ack = await js.publish(f"forged.{target}", b"{}")
            await js.delete_msg(target, ack.seq)
            continue
        await js.publish(f"forged.{target}", data)


async def test_appends_chain_from_genesis_and_verify(pnc: NATS) -> None:
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 5)
    stored = await records(pnc, "KEYVEIL_AUDIT_LEDGER")
    assert [seq for seq, _ in stored] == [1, 2, 3, 4, 5]
    first = LedgerRecord.model_validate_json(stored[0][1])
    assert first.prev_hash == GENESIS_HASH
    assert first.hash == chain_hash(GENESIS_HASH, first.content)
    assert first.event == audit_event(1)
    assert first.subject == KM_SUBJECT
    assert first.key_id == SIGNER.key_id
    result = await verify_ledger(pnc.jetstream(), "KEYVEIL_AUDIT_LEDGER", verifier=VERIFIER)
    assert result.ok
    assert (result.checked, result.first_seq, result.last_seq) == (5, 1, 5)


async def test_redelivered_event_appends_nothing(pnc: NATS) -> None:
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 2)
    again = await writer.append(audit_event(2), event_id="ev-2", subject=KM_SUBJECT)
    assert again == 2
    assert await writer.append(audit_event(3), event_id="ev-3", subject=KM_SUBJECT) == 3
    assert len(await records(pnc, "KEYVEIL_AUDIT_LEDGER")) == 3
    assert (await verify_ledger(pnc.jetstream(), "KEYVEIL_AUDIT_LEDGER", verifier=VERIFIER)).ok


async def test_concurrent_writers_never_fork_the_chain(private_nats: ServerProcess) -> None:
    clients = [await nats.connect(private_nats.url) for _ in range(3)]
    try:
        writers = [
            Ledger(c.jetstream(), instance=f"replica-{i}", signer=SIGNER)
            for i, c in enumerate(clients)
        ]
        await writers[0].ensure()

        async def write(i: int) -> None:
            for n in range(20):
                event = audit_event(i * 100 + n)
                await writers[i].append(event, event_id=f"w{i}-{n}", subject=KM_SUBJECT)

        await asyncio.gather(*(write(i) for i in range(3)))
        stored = await records(clients[0], "KEYVEIL_AUDIT_LEDGER")
        assert len(stored) == 60
        parents = [LedgerRecord.model_validate_json(raw).prev_hash for _, raw in stored]
        assert len(set(parents)) == 60, "two records share a parent: the chain forked"
        assert verify_chain(stored, verifier=VERIFIER, anchor=GENESIS_HASH).ok
    finally:
        for client in clients:
            await client.close()


async def test_ledger_stream_refuses_delete_and_purge(pnc: NATS) -> None:
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 2)
    js = pnc.jetstream()
    with pytest.raises(nats.js.errors.APIError):
        await js.delete_msg("KEYVEIL_AUDIT_LEDGER", 1)
    with pytest.raises(nats.js.errors.APIError):
        await js.purge_stream("KEYVEIL_AUDIT_LEDGER")
    assert (await js.stream_info("KEYVEIL_AUDIT_LEDGER")).state.messages == 2


async def test_verify_finds_a_modified_record(pnc: NATS) -> None:
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 6)
    stored = dict(await records(pnc, "KEYVEIL_AUDIT_LEDGER"))
    record = json.loads(stored[3])
    record["event"]["outcome"] = "denied"  # someone edits what happened
    await copy_stream(pnc, "KEYVEIL_AUDIT_LEDGER", "FORGED_EDIT", {3: json.dumps(record).encode()})
    result = await verify_ledger(pnc.jetstream(), "FORGED_EDIT", verifier=VERIFIER)
    assert not result.ok
    assert result.broken is not None
    assert (result.broken.seq, result.checked) == (3, 2)
    assert result.broken.code == "foreign"
    assert "hash" in result.broken.reason


async def test_verify_finds_a_rehashed_record_by_its_successor(pnc: NATS) -> None:
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 6)
    stored = dict(await records(pnc, "KEYVEIL_AUDIT_LEDGER"))
    record = json.loads(stored[4])
    record["event"]["key_id"] = "key-other"
    edited = LedgerRecord.model_validate(record)
    record["hash"] = chain_hash(record["prev_hash"], edited.content)  # a careful forger
    await copy_stream(
        pnc, "KEYVEIL_AUDIT_LEDGER", "FORGED_REHASH", {4: json.dumps(record).encode()}
    )
    result = await verify_ledger(pnc.jetstream(), "FORGED_REHASH", verifier=VERIFIER)
    # Without the signing key the new hash cannot be signed: the record is foreign, and
    # its successor, chained to the original, no longer links either.
    assert [(p.seq, p.code) for p in result.problems] == [(4, "foreign"), (5, "prev_hash")]
    assert result.problems[0].reason == "foreign record: signature does not verify"
    assert result.problems[1].reason == "prev_hash does not match"
    # Accepting the foreign record does not accept the break it left behind.
    rest, accepted = accept_foreign(result, {4, 5})
    assert accepted == [4]
    assert [(p.seq, p.code) for p in rest.problems] == [(5, "prev_hash")]


async def test_verify_finds_a_missing_record(pnc: NATS) -> None:
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 5)
    await copy_stream(pnc, "KEYVEIL_AUDIT_LEDGER", "FORGED_GAP", {3: None})
    result = await verify_ledger(pnc.jetstream(), "FORGED_GAP", verifier=VERIFIER)
    assert result.broken is not None
    assert result.broken.seq == 3
    assert "missing" in result.broken.reason


async def test_cli_verify_reports_first_broken_link(
    pnc: NATS, private_nats: ServerProcess, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("NATS_URL", private_nats.url)
    monkeypatch.setenv("LEDGER_VERIFY_KEY", SIGNER.public_key_b64)
    monkeypatch.delenv("LEDGER_CHECKPOINT_DIR", raising=False)
    writer = ledger(pnc)
    await writer.ensure()
    await fill(writer, 4)
    assert await asyncio.to_thread(cli.main, ["audit", "verify"]) == 0
    assert "ok: 4 records chained (seq 1..4)" in capsys.readouterr().out

    stored = dict(await records(pnc, "KEYVEIL_AUDIT_LEDGER"))
    forged = stored[2].replace(b"lease_granted", b"lease_revoked")
    await copy_stream(pnc, "KEYVEIL_AUDIT_LEDGER", "FORGED_CLI", {2: forged})
    code = await asyncio.to_thread(
        cli.main, ["audit", "verify", "--stream", "FORGED_CLI", "--json"]
    )
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["broken_seq"] == 2


def test_ledger_stream_is_append_only_by_configuration() -> None:
    assert LEDGER_STREAM.deny_delete is True
    assert LEDGER_STREAM.deny_purge is True
    assert replace(LEDGER_STREAM).subjects == ["keyveil.ledger.audit"]
