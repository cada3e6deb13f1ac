"""The auditor's job in one place: what happens to each usage and audit event."""

from __future__ import annotations

import json
import time
from typing import Any

from nats.aio.msg import Msg
from prometheus_client import Counter

from services.auditor.alerts import AlertSink
from services.auditor.consumers import RefuseEvent
from services.auditor.detectors import Detectors, Finding
from services.auditor.ledger import Ledger, canonical_json
from services.auditor.publishers import publisher_mismatch
from shared.events import AuditEvent, UsageEvent

__all__ = ["MISATTRIBUTED", "Auditor"]

MISATTRIBUTED = Counter(
    "keyveil_auditor_audit_events_refused_total",
    "Audit events refused because their subject's publisher may not have sent them",
    ["code"],
)


class Auditor:
    """Feeds events to the detectors and audit events to the ledger; raises what they find.

    Handlers either finish (the consumer then acks) or raise before touching detector
    state (the consumer naks, and the redelivery is the first delivery as far as the
    detectors know), so nothing is counted twice. An audit event its subject's
    publisher may not have sent is refused: alerted, termed, never in the ledger.
    """

    def __init__(self, detectors: Detectors, sink: AlertSink, ledger: Ledger | None) -> None:
        self.detectors = detectors
        self.sink = sink
        self.ledger = ledger

    async def on_usage(self, event: UsageEvent, _: Msg | None = None) -> None:
        for finding in self.detectors.observe_usage(event):
            self.sink.raise_alert(finding)

    async def on_audit(self, event: AuditEvent, msg: Msg | None = None) -> None:
        # The payload as published, not our re-serialisation: fields this version
        # does not know are kept, and the hash covers exactly what was sent.
        raw: dict[str, Any] = (
            json.loads(msg.data) if msg is not None else event.model_dump(mode="json")
        )
        subject = msg.subject if msg is not None else event.subject
        try:
            canonical_json(raw)
        except ValueError:  # NaN or infinity: it could never be hashed, only redelivered
            raise RefuseEvent("not_canonical_json") from None
        mismatch = publisher_mismatch(subject, raw)
        if mismatch is not None:
            MISATTRIBUTED.labels(mismatch.code).inc()
            now = time.time()
            # Every refusal is counted; a login forging a stream of them raises one alert
            # per (code, subject) and cooldown, not one each.
            key = f"audit_publisher_mismatch|{mismatch.code}|{subject}"
            if self.detectors.cooldown.allow(key, now, self.detectors.settings.alert_cooldown_s):
                self.sink.raise_alert(
                    Finding(
                        type="audit_publisher_mismatch",
                        severity="critical",
                        subject=subject,
                        summary=f"audit event refused: {mismatch.reason}",
                        ts=now,
                        labels={"code": mismatch.code, "audit_subject": subject[:128]},
                    )
                )
            raise RefuseEvent(mismatch.code)
        if self.ledger is not None:
            await self.ledger.append(raw, event_id=event.event_id, subject=subject)
        for finding in self.detectors.observe_audit(event):
            self.sink.raise_alert(finding)
