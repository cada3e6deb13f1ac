"""The ledger with the auditor's real NATS login (deploy/nats/auth.conf, bootstrapped
streams): appending, finding the head past a foreign record and checkpointing need no
permission the auditor lacks (it may get ledger messages, not make consumers on it)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyveil.servers import ServerProcess, bootstrap_nats, nats_password, start_nats
from services.auditor.checkpoints import Checkpointer, CheckpointStore
from services.auditor.ledger import LEDGER_SUBJECT, BrokenLink, Ledger
from services.auditor.settings import Settings
from shared import bus
from shared.settings import load_settings
from tests.services.auditor.helpers import KM_SUBJECT, SIGNER, VERIFIER

AUTH_CONF = Path(__file__).resolve().parents[3] / "deploy" / "nats" / "auth.conf"
USERS = ("token", "proxy", "keymanager", "auditor", "operator", "observer", "bootstrap")


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    passwords = {user: nats_password() for user in USERS}
    shutil.copyfile(AUTH_CONF, tmp_path / "auth.conf")
    config = tmp_path / "nats.conf"
    config.write_text('include "auth.conf"\n')
    env = {f"KEYVEIL_NATS_PASSWORD_{u.upper()}": p for u, p in passwords.items()}
    server = start_nats(tmp_path, config=config, env=env)
    try:
        bootstrap_nats(server.url, user="bootstrap", password=passwords["bootstrap"])
        yield server, passwords
    finally:
        server.stop()


async def test_auditor_login_appends_skips_foreign_and_checkpoints(
    secured_nats: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, passwords = secured_nats
    settings = load_settings(
        Settings, nats_url=server.url, nats_user="auditor", nats_password=passwords["auditor"]
    )
    nc = await bus.connect(settings, name="auditor")
    try:
        js = nc.jetstream()
        ledger = Ledger(js, instance="login-test", signer=SIGNER)
        for n in (1, 2):
            event = {"event_id": f"e{n}", "service": "keymanager", "type": "key_store"}
            await ledger.append(event, event_id=f"e{n}", subject=KM_SUBJECT)
        await js.publish(LEDGER_SUBJECT, b"junk")  # a foreign record, seq 3
        restarted = Ledger(js, instance="login-test-2", signer=SIGNER)
        event = {"event_id": "e4", "service": "keymanager", "type": "key_store"}
        assert await restarted.append(event, event_id="e4", subject=KM_SUBJECT) == 4

        problems: list[BrokenLink] = []
        checkpointer = Checkpointer(
            js,
            stream="KEYVEIL_AUDIT_LEDGER",
            signer=SIGNER,
            verifier=VERIFIER,
            store=CheckpointStore(tmp_path / "cp"),
            interval_s=60,
            on_problem=problems.extend,
        )
        written = await checkpointer.checkpoint_once()
        assert written is not None
        assert (written.seq, written.records) == (4, 4)
        assert [(p.seq, p.code) for p in problems] == [(3, "foreign")]
        await nc.flush()
    finally:
        await nc.close()
    assert "violation" not in server.log_path.read_text().lower()
