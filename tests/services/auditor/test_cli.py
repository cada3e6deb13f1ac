"""`keyveil audit tail|query` and `keyveil alerts tail` against a real JetStream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from keyveil import cli
from keyveil.commands.audit import parse_since
from keyveil.servers import ServerProcess, start_nats
from services.auditor.alerts import AlertSink
from services.auditor.detectors import Finding
from shared.events import EventPublisher
from tests.services.auditor.helpers import KM_SUBJECT, ledger


@pytest.fixture(autouse=True)
def operator_env(private_nats: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", private_nats.url)
    monkeypatch.delenv("NATS_USER", raising=False)


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def seed_ledger(nc: NATS) -> None:
    writer = ledger(nc)
    await writer.ensure()
    now = time.time()
    rows = [
        ("lease_granted", now - 7200, "k1"),
        ("key_rotate", now - 600, "k1"),
        ("lease_granted", now - 300, "k2"),
        ("lease_denied", now - 60, "k2"),
    ]
    for n, (kind, ts, key) in enumerate(rows):
        event = {"event_id": f"e{n}", "service": "keymanager", "type": kind, "actor": "proxy",
                 "outcome": "denied" if kind == "lease_denied" else "success", "key_id": key,
                 "ts": ts}  # fmt: skip
        await writer.append(event, event_id=f"e{n}", subject=KM_SUBJECT)


async def test_audit_tail_shows_the_last_records(
    pnc: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed_ledger(pnc)
    assert await run_cli("audit", "tail", "-n", "2") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "seq=3" in lines[0]
    assert "lease_granted" in lines[0]
    assert "seq=4" in lines[1]
    assert "lease_denied" in lines[1]
    assert "hash=" in lines[1]


async def test_audit_query_since_and_type(pnc: NATS, capsys: pytest.CaptureFixture[str]) -> None:
    await seed_ledger(pnc)
    assert await run_cli("audit", "query", "--since", "1h", "--type", "lease_*", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The 2-hour-old grant is before --since; the rotation is not a lease_* type.
    assert [r["event"]["type"] for r in rows] == ["lease_granted", "lease_denied"]
    assert all(len(r["hash"]) == 64 for r in rows)
    assert await run_cli("audit", "query", "--since", "3h", "--outcome", "denied") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert "lease_denied" in out[0]


def test_parse_since() -> None:
    assert parse_since("30m", now=10_000) == 10_000 - 1800
    assert parse_since("2d", now=200_000) == 200_000 - 172_800
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000
    assert parse_since("2023-11-14T22:13:20") == 1_700_000_000


async def test_audit_query_rejects_a_bad_since(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("audit", "query", "--since", "yesterday-ish") == 2
    assert "--since" in capsys.readouterr().err


async def test_alerts_tail_filters_by_severity_and_type(
    pnc: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher = EventPublisher(pnc.jetstream())
    publisher.start()
    sink = AlertSink(publisher)
    sink.raise_alert(Finding("auth_failure_burst", "warning", "ip", "burst from 192.0.2.1", 1.0))
    sink.raise_alert(Finding("replay_attempts", "critical", "t", "3 replays for t", 2.0))
    sink.raise_alert(Finding("geo_new_country", "info", "k", "key k used from BR", 3.0))
    assert await publisher.flush(10)
    await publisher.close()

    assert await run_cli("alerts", "tail") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    burst = next(line for line in lines if "auth_failure_burst" in line)
    assert "WARNING" in burst
    assert "192.0.2.1" in burst

    assert await run_cli("alerts", "tail", "--severity", "warning", "--json") == 0
    types = [json.loads(line)["type"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(types) == ["auth_failure_burst", "replay_attempts"]

    assert await run_cli("alerts", "tail", "--type", "geo_*", "-n", "5") == 0
    (only,) = capsys.readouterr().out.strip().splitlines()
    assert "geo_new_country" in only


async def test_alerts_tail_without_a_stream_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = start_nats(tmp_path / "bare")  # never bootstrapped: no streams at all
    monkeypatch.setenv("NATS_URL", bare.url)
    try:
        assert await run_cli("alerts", "tail") == 2
    finally:
        bare.stop()
    assert "no alerts stream" in capsys.readouterr().err
