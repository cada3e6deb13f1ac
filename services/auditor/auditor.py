"""The auditor's job in one place: what happens to each usage and audit event."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.msg import Msg

from services.auditor.alerts import AlertSink
from services.auditor.detectors import Detectors
from services.auditor.ledger import Ledger
from shared.events import AuditEvent, UsageEvent

__all__ = ["Auditor"]


class Auditor:
    """Feeds events to the detectors and audit events to the ledger; raises what they find.

    Handlers either finish (the consumer then acks) or raise before touching detector
    state (the consumer naks, and the redelivery is the first delivery as far as the
    detectors know), so nothing is counted twice.
    """

    def __init__(self, detectors: Detectors, sink: AlertSink, ledger: Ledger | None) -> None:
        self.detectors = detectors
        self.sink = sink
        self.ledger = ledger

    async def on_usage(self, event: UsageEvent, _: Msg | None = None) -> None:
        for finding in self.detectors.observe_usage(event):
            self.sink.raise_alert(finding)

    async def on_audit(self, event: AuditEvent, msg: Msg | None = None) -> None:
        if self.ledger is not None:
            # The payload as published, not our re-serialisation: fields this version
            # does not know are kept, and the hash covers exactly what was sent.
            raw: dict[str, Any] = (
                json.loads(msg.data) if msg is not None else event.model_dump(mode="json")
            )
            await self.ledger.append(raw, event_id=event.event_id)
        for finding in self.detectors.observe_audit(event):
            self.sink.raise_alert(finding)
