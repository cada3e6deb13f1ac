"""Builders shared by the auditor tests: settings, events on a timeline, ledger keys."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from services.auditor.ledger import LEDGER_STREAM, Ledger
from services.auditor.ledgerkeys import LedgerSigner
from services.auditor.settings import Settings
from shared.contract import Refusal
from shared.events import AuditEvent, UsageEvent
from shared.eventschema import Refused, RotationDue
from shared.settings import load_settings

T0 = 1_700_000_000.0

# One signing key for the test session; verifiers get only its public half.
SIGNER = LedgerSigner.generate()
VERIFIER = SIGNER.verifier()
KM_SUBJECT = "keyveil.audit.keymanager"


def ledger(
    nc: NATS, *, stream: StreamConfig = LEDGER_STREAM, signer: LedgerSigner = SIGNER
) -> Ledger:
    return Ledger(nc.jetstream(), instance="test", signer=signer, stream=stream)


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "auth_failure_threshold": 10,
        "auth_failure_window_s": 60.0,
        "token_ip_threshold": 20,
        "token_window_s": 60.0,
        "token_rate_min_count": 30,
        "proxy_error_ratio": 0.3,
        "proxy_error_min_requests": 20,
        "baseline_bucket_s": 60.0,
        "baseline_warmup_buckets": 5,
        "spike_z": 6.0,
        "spike_min_count": 30,
        "replay_threshold": 3,
        "tamper_threshold": 3,
        "geo_key_warmup_events": 20,
        "alert_cooldown_s": 600.0,
    }
    base.update(overrides)
    return load_settings(Settings, **base)


def denied(reason: str, *, ts: float, ip: str = "203.0.113.7", **fields: Any) -> UsageEvent:
    """A refusal: typed (v2) for a contract code, else a v1 event with that v1 reason
    ("signature", "expired", ...), read as the auditor reads the streams' older events."""
    base = {"service": "proxy", "type": "proxy.rejected", "outcome": "denied"}
    refusal = Refusal.parse(reason)
    if refusal is not None:
        return UsageEvent(**base, reason=Refused.of(refusal), client_ip=ip, ts=ts, **fields)
    v1 = {**base, "schema_version": 1, "reason": reason, "client_ip": ip, "ts": ts, **fields}
    return UsageEvent.model_validate(v1)


def issued(*, ts: float, ip: str = "198.51.100.1", **fields: Any) -> UsageEvent:
    return UsageEvent(
        service="token", type="token.issued", mode="proxy", client_ip=ip, ts=ts, **fields
    )


def proxied(*, ts: float, status: int = 200, **fields: Any) -> UsageEvent:
    fields.setdefault("outcome", "ok" if status < 500 else "error")
    fields.setdefault("type", "proxy.request")
    return UsageEvent(service="proxy", status=status, path="/v1/chat/completions", ts=ts, **fields)


def rotation_due(*, ts: float, key_id: str = "key-openai-1") -> AuditEvent:
    return AuditEvent(
        service="keymanager",
        type="rotation_due",
        actor="keymanager",
        key_id=key_id,
        provider="openai",
        environment="production",
        detail=RotationDue(age_s=95 * 86_400),
        ts=ts,
    )


def normal_traffic(start: float, minutes: int) -> list[UsageEvent]:
    """A quiet, steady baseline: tokens from many IPs, successful proxy calls, a few typos."""
    events: list[UsageEvent] = []
    for minute in range(minutes):
        base = start + minute * 60
        for i in range(8):
            events.append(issued(ts=base + i * 7, ip=f"198.51.100.{i + 1}"))
        for i in range(12):
            events.append(
                proxied(
                    ts=base + i * 5,
                    status=500 if i == 0 and minute % 3 == 0 else 200,
                    key_id="key-openai-1",
                    token_id=f"tok-{i % 4}",
                    country="DE" if i % 2 else "FR",
                )
            )
        if minute % 4 == 0:
            events.append(denied("expired", ts=base + 30, ip=f"198.51.100.{minute % 8 + 1}"))
    return events
