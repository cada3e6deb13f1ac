"""Audit events bound to their publisher: the table, the producers it must cover, and the
auditor refusing (term + alert + counter, never the ledger) what a publisher may not send."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from keyveil.servers import ServerProcess
from services.auditor.app import AuditorRuntime, start_runtime, stop_runtime
from services.auditor.ledger import LEDGER_SUBJECT, read_stream, verify_chain
from services.auditor.publishers import PUBLISHERS, publisher_mismatch
from shared.events import AuditEvent
from tests.services.auditor.helpers import settings
from tests.support import until

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("subject", "service", "event_type", "code"),
    [
        ("keyveil.audit.keymanager", "keymanager", "lease_granted", None),
        ("keyveil.audit.keymanager", "keymanager", "admin_rotate", None),
        ("keyveil.audit.keymanager", "keymanager", "rotation_due", None),
        ("keyveil.audit.keymanager", "keymanager", "decrypt_failed", None),
        ("keyveil.audit.token", "token", "token.revoked", None),
        ("keyveil.audit.operator", "operator", "token.revoked", None),
        ("keyveil.audit.token", "keymanager", "key_rotate", "service_mismatch"),
        ("keyveil.audit.token", "token", "key_rotate", "type_not_allowed"),
        ("keyveil.audit.proxy", "proxy", "lease_granted", "type_not_allowed"),
        ("keyveil.audit.keymanager", "keymanager", None, "type_not_allowed"),
        ("keyveil.audit.auditor", "auditor", "key_rotate", "type_not_allowed"),
        ("keyveil.audit.bootstrap", "bootstrap", "key_rotate", "unknown_publisher"),
        ("keyveil.audit.proxy", "proxy", "stream.drift", None),
        ("keyveil.usage.token", "token", "token.revoked", "not_audit_subject"),
    ],
)
def test_publisher_table(subject: str, service: str, event_type: str | None, code: str) -> None:
    mismatch = publisher_mismatch(subject, {"service": service, "type": event_type})
    assert (mismatch.code if mismatch else None) == code


def test_every_audit_type_the_producers_emit_is_in_the_table() -> None:
    """Scan the producers' source, so a new audit type cannot be refused by surprise."""
    keymanager = "\n".join(p.read_text() for p in (ROOT / "services/keymanager").glob("*.py"))
    types = set(re.findall(r'audit\(\s*"([a-z_.]+)"', keymanager))
    types |= set(re.findall(r'"(lease_[a-z]+)" if', keymanager))
    types |= {f"admin_{op}" for op in ("intake", "add", "list", "show", "rotate", "revoke")}
    assert {"key_store", "key_rotate", "lease_granted", "decrypt_failed"} <= types
    for event_type in types:
        assert (
            publisher_mismatch(
                "keyveil.audit.keymanager", {"service": "keymanager", "type": event_type}
            )
            is None
        ), event_type
    token = (ROOT / "services/token/app.py").read_text()
    operator = "\n".join(p.read_text() for p in (ROOT / "keyveil/commands").glob("*.py"))
    for publisher, source in (("token", token), ("operator", operator)):
        found = re.findall(rf'AuditEvent\(\s*service="{publisher}",\s*type="([a-z_.]+)"', source)
        if publisher == "operator":  # keyveil.operator.publish_operator_audit(dir, "type", ...)
            found += re.findall(r'publish_operator_audit\(\s*\w+,\s*"([a-z_.]+)"', source)
        assert found, publisher
        for event_type in found:
            assert (
                publisher_mismatch(
                    f"keyveil.audit.{publisher}", {"service": publisher, "type": event_type}
                )
                is None
            ), (publisher, event_type)
    # Every service's stream guard reports drift as an audit event under its own name.
    events = (ROOT / "shared/events.py").read_text()
    (drift,) = re.findall(r'type="(stream\.[a-z_]+)"', events)
    # One reporter, in the runtime every service starts through, named by the service.
    runtime = (ROOT / "shared/runtime.py").read_text()
    assert runtime.count("drift_reporter(self._publisher, self.service)") == 1
    for name in ("token", "proxy", "keymanager", "auditor"):
        assert "ServiceRuntime" in (ROOT / f"services/{name}/app.py").read_text(), name
    for publisher in ("token", "proxy", "keymanager", "auditor"):
        assert (
            publisher_mismatch(f"keyveil.audit.{publisher}", {"service": publisher, "type": drift})
            is None
        ), publisher
    assert set(PUBLISHERS) == {"keymanager", "token", "operator", "proxy", "auditor"}


@pytest.fixture
async def runtime(private_nats: ServerProcess) -> AsyncIterator[AuditorRuntime]:
    rt = await start_runtime(settings(nats_url=private_nats.url))
    await until(lambda: all(consumer.bound for consumer in rt.consumers))
    yield rt
    await stop_runtime(rt)


async def publish_on(nc: NATS, subject: str, event: AuditEvent) -> None:
    """What a login allowed on `subject` can publish: any body, any `service` in it."""
    await nc.jetstream().publish(
        subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id}
    )


def refused(code: str) -> float:
    value = REGISTRY.get_sample_value("keyveil_auditor_audit_events_refused_total", {"code": code})
    return value or 0.0


async def ledger_events(nc: NATS) -> list[dict[str, object]]:
    return [json.loads(raw) async for _, raw in read_stream(nc.jetstream(), "KEYVEIL_AUDIT_LEDGER")]


async def test_auditor_refuses_events_from_the_wrong_publisher(
    runtime: AuditorRuntime, pnc: NATS
) -> None:
    before = refused("service_mismatch"), refused("type_not_allowed")
    # The token login writes a key rotation claiming to be the key-manager...
    forged = AuditEvent(service="keymanager", type="key_rotate", actor="keymanager", key_id="k1")
    again = AuditEvent(service="keymanager", type="key_revoke", actor="keymanager", key_id="k1")
    # ...or in its own name, which it may not emit either.
    own_name = AuditEvent(service="token", type="key_rotate", actor="token", key_id="k1")
    genuine = AuditEvent(service="token", type="token.revoked", actor="token-holder")
    for event in (forged, again, own_name, genuine):
        await publish_on(pnc, "keyveil.audit.token", event)
    audit = runtime.consumers[1]
    await until(lambda: genuine.event_id in audit.seen)
    await until(lambda: len(runtime.auditor.sink.raised) >= 2)

    stored = await ledger_events(pnc)
    assert [r["event"]["event_id"] for r in stored] == [genuine.event_id]  # type: ignore[index]
    assert stored[0]["subject"] == "keyveil.audit.token"
    # One alert per kind of forgery (cooldown), every refusal counted.
    alerts = [a for a in runtime.auditor.sink.raised if a.type == "audit_publisher_mismatch"]
    assert sorted(a.labels["code"] for a in alerts) == ["service_mismatch", "type_not_allowed"]
    assert all(a.severity == "critical" for a in alerts)
    assert (refused("service_mismatch"), refused("type_not_allowed")) == (
        before[0] + 2,
        before[1] + 1,
    )
    # Termed, not left for redelivery: nothing pending, nothing awaiting an ack.
    info = await pnc.jetstream().consumer_info("KEYVEIL_AUDIT", "auditor-audit")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert forged.event_id not in audit.seen
    assert again.event_id not in audit.seen


async def test_auditor_keeps_recording_after_a_foreign_ledger_record(
    runtime: AuditorRuntime, pnc: NATS
) -> None:
    first = AuditEvent(service="keymanager", type="lease_granted", actor="proxy", key_id="k1")
    await publish_on(pnc, "keyveil.audit.keymanager", first)
    audit = runtime.consumers[1]
    await until(lambda: first.event_id in audit.seen)
    # What the key-manager reply-subject injection did: a non-record on the ledger subject.
    await pnc.jetstream().publish(LEDGER_SUBJECT, b'{"error":{"code":"bad_request"}}')
    later = [
        AuditEvent(service="keymanager", type="key_rotate", actor="operator", key_id="k1"),
        AuditEvent(service="keymanager", type="lease_granted", actor="proxy", key_id="k1"),
    ]
    for event in later:
        await publish_on(pnc, "keyveil.audit.keymanager", event)
    await until(lambda: all(e.event_id in audit.seen for e in later))

    raw = [item async for item in read_stream(pnc.jetstream(), "KEYVEIL_AUDIT_LEDGER")]
    assert [seq for seq, _ in raw] == [1, 2, 3, 4]
    assert runtime.auditor.ledger is not None
    result = verify_chain(raw, verifier=runtime.auditor.ledger.verifier)
    assert [(p.seq, p.code) for p in result.problems] == [(2, "foreign")]
    assert result.checked == 3
    assert [json.loads(r)["event"]["event_id"] for s, r in raw if s != 2] == [
        first.event_id,
        *(e.event_id for e in later),
    ]


async def test_an_event_that_cannot_be_hashed_is_termed_not_redelivered(
    runtime: AuditorRuntime, pnc: NATS
) -> None:
    body = (
        b'{"event_id":"nan-1","service":"keymanager","type":"key_store","actor":"x",'
        b'"ts":1700000000,"detail":{"n":NaN}}'
    )
    await pnc.jetstream().publish(
        "keyveil.audit.keymanager", body, headers={"Nats-Msg-Id": "nan-1"}
    )
    after = AuditEvent(service="keymanager", type="key_store", actor="operator")
    await publish_on(pnc, "keyveil.audit.keymanager", after)
    audit = runtime.consumers[1]
    await until(lambda: after.event_id in audit.seen)
    stored = await ledger_events(pnc)
    assert [r["event"]["event_id"] for r in stored] == [after.event_id]  # type: ignore[index]
    info = await pnc.jetstream().consumer_info("KEYVEIL_AUDIT", "auditor-audit")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
