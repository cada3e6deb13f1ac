"""The ledger as the running auditor wires it: the signing key from settings (or a
recorded development key), checkpoints on a schedule, alerts on foreign records, and
`keyveil audit verify` reading the same directory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from keyveil import cli
from keyveil.servers import ServerProcess
from services.auditor.app import start_runtime, stop_runtime
from services.auditor.checkpoints import CheckpointStore, ephemeral_verifier
from services.auditor.ledger import LEDGER_SUBJECT, read_stream, verify_chain
from services.auditor.ledgerkeys import LedgerSigner
from shared.events import AuditEvent
from tests.services.auditor.helpers import settings
from tests.support import until


async def publish(nc: NATS, event: AuditEvent) -> None:
    await nc.jetstream().publish(
        event.subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id}
    )


def lease() -> AuditEvent:
    return AuditEvent(service="keymanager", type="lease_granted", actor="proxy", key_id="k1")


async def test_runtime_signs_checkpoints_and_alerts_on_a_foreign_record(
    private_nats: ServerProcess, pnc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    signer = LedgerSigner.generate()
    directory = tmp_path / "checkpoints"
    rt = await start_runtime(
        settings(
            nats_url=private_nats.url,
            ledger_signing_key=signer.seed_b64(),
            ledger_checkpoint_dir=str(directory),
            ledger_checkpoint_interval_s=0.2,
        )
    )
    try:
        await until(lambda: all(c.bound for c in rt.consumers))
        events = [lease() for _ in range(3)]
        for event in events:
            await publish(pnc, event)
        store = CheckpointStore(directory)
        await until(lambda: (c := store.load("KEYVEIL_AUDIT_LEDGER", signer.verifier()).latest)
                    is not None and c.seq == 3)  # fmt: skip

        monkeypatch.setenv("NATS_URL", private_nats.url)
        monkeypatch.setenv("LEDGER_VERIFY_KEY", signer.public_key_b64)
        argv = ["audit", "verify", "--checkpoint-dir", str(directory)]
        assert await asyncio.to_thread(cli.main, argv) == 0
        assert "checkpoint seq 3 found" in capsys.readouterr().out

        await pnc.jetstream().publish(LEDGER_SUBJECT, b"not a record")
        later = lease()
        await publish(pnc, later)
        await until(lambda: any(a.type == "ledger_foreign_record" for a in rt.auditor.sink.raised))
        alert = next(a for a in rt.auditor.sink.raised if a.type == "ledger_foreign_record")
        assert alert.labels["seq"] == "4"
        await until(lambda: (c := store.load("KEYVEIL_AUDIT_LEDGER", signer.verifier()).latest)
                    is not None and c.seq == 5)  # fmt: skip
        assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert (report["code"], report["broken_seq"], report["head_seq"]) == ("foreign", 4, 5)
    finally:
        await stop_runtime(rt)
    # The seed is nowhere in what was written to disk.
    for path in directory.rglob("*"):
        if path.is_file():
            assert signer.seed_b64() not in path.read_text()


async def one_development_run(private_nats: ServerProcess, pnc: NATS, directory: Path) -> None:
    rt = await start_runtime(
        settings(nats_url=private_nats.url, ledger_checkpoint_dir=str(directory))
    )
    try:
        await until(lambda: all(c.bound for c in rt.consumers))
        event = lease()
        await publish(pnc, event)
        await until(lambda: event.event_id in rt.consumers[1].seen)
    finally:
        await stop_runtime(rt)


async def test_development_key_is_recorded_so_verify_works(
    private_nats: ServerProcess, pnc: NATS, tmp_path: Path
) -> None:
    directory = tmp_path / "checkpoints"
    # Two development runs, each with its own generated key.
    for _ in range(2):
        await one_development_run(private_nats, pnc, directory)
    recorded = ephemeral_verifier(directory)
    assert len(recorded) == 2
    # The second run chained after the first one's record, and both verify.
    raw = [item async for item in read_stream(pnc.jetstream(), "KEYVEIL_AUDIT_LEDGER")]
    result = verify_chain(raw, verifier=recorded)
    assert result.ok, result.problems
    assert result.checked == 2
    assert {json.loads(r)["key_id"] for _, r in raw} == recorded.key_ids
