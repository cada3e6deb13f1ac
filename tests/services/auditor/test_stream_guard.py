"""Stream drift: a service's StreamGuard notices, says so on the bus, and the auditor alerts."""

from __future__ import annotations

import json
from dataclasses import replace

from nats.aio.client import Client as NATS

from services.auditor.detectors import Detectors
from shared.events import AuditEvent, EventPublisher, drift_reporter
from shared.eventschema import StreamDrift
from shared.streams import EDGE_STREAMS, USAGE_STREAM, StreamGuard, check_streams
from tests.services.auditor.helpers import settings


async def test_drift_makes_the_guard_not_ready_and_the_auditor_alert(pnc: NATS) -> None:
    js = pnc.jetstream()
    publisher = EventPublisher(js)
    publisher.start()
    guard = StreamGuard(js, EDGE_STREAMS, on_drift=drift_reporter(publisher, "proxy"))
    try:
        assert await guard.check()
        # What the red team did with a service login before the permissions were fixed.
        await js.update_stream(replace(USAGE_STREAM, max_msgs=1))

        assert not await guard.check()
        assert not await guard.ready()
        assert await publisher.flush(5)
    finally:
        await publisher.close()
    sub = await js.subscribe("keyveil.audit.proxy", ordered_consumer=True)
    recorded = AuditEvent.model_validate_json((await sub.next_msg(timeout=5)).data)
    await sub.unsubscribe()

    assert recorded.type == "stream.drift"
    assert recorded.detail == StreamDrift(streams={"KEYVEIL_USAGE": ["max_msgs"]})
    (finding,) = Detectors(settings()).observe_audit(recorded)
    assert finding.type == "stream_config_drift"
    assert finding.severity == "critical"
    assert "KEYVEIL_USAGE" in finding.summary

    await js.update_stream(USAGE_STREAM)  # bootstrap's convergence restores readiness
    assert await check_streams(js, EDGE_STREAMS) == []
    assert await guard.check()
    assert json.loads(recorded.model_dump_json())["service"] == "proxy"


async def test_a_missing_stream_is_drift_too(pnc: NATS) -> None:
    js = pnc.jetstream()
    await js.delete_stream("KEYVEIL_ALERTS")  # an unauthenticated test server allows it
    (drift,) = await check_streams(js, ["KEYVEIL_ALERTS", "KEYVEIL_USAGE"])
    assert drift.missing
    assert "keyveil bootstrap" in drift.describe()
