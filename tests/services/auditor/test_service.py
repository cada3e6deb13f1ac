"""The auditor against a real JetStream: alerts on the bus, idempotent redelivery,
the ledger fed from the audit stream, and catch-up after a stop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from keyveil.servers import ServerProcess
from services.auditor.app import AuditorRuntime, start_runtime, stop_runtime
from services.auditor.consumers import DurableConsumer
from services.auditor.ledger import read_stream, verify_chain
from shared.events import AUDIT_STREAM, USAGE_STREAM, AlertEvent, Event, EventPublisher, UsageEvent
from tests.services.auditor.helpers import T0, denied, normal_traffic, rotation_due, settings
from tests.support import ServiceProcess, until


class AlertInbox:
    """Every alert the auditor publishes (core subscription on keyveil.alerts.>)."""

    def __init__(self) -> None:
        self.alerts: list[AlertEvent] = []
        self.arrived = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.alerts.append(AlertEvent.model_validate_json(msg.data))
        self.arrived.set()

    async def wait_for(self, alert_type: str, timeout: float = 15.0) -> AlertEvent:
        async with asyncio.timeout(timeout):
            while True:
                for alert in self.alerts:
                    if alert.type == alert_type:
                        return alert
                self.arrived.clear()
                await self.arrived.wait()

    @property
    def types(self) -> list[str]:
        return sorted(a.type for a in self.alerts)


@pytest.fixture
async def inbox(pnc: NATS) -> AsyncIterator[AlertInbox]:
    box = AlertInbox()
    sub = await pnc.subscribe("keyveil.alerts.>", cb=box.on_msg)
    yield box
    await sub.unsubscribe()


@pytest.fixture
async def runtime(private_nats: ServerProcess) -> AsyncIterator[AuditorRuntime]:
    rt = await start_runtime(settings(nats_url=private_nats.url))
    # The consumers create their streams in the background; tests publish straight away.
    await until(lambda: all(consumer.bound for consumer in rt.consumers))
    yield rt
    await stop_runtime(rt)


async def publish(nc: NATS, events: list[Any]) -> None:
    publisher = EventPublisher(nc.jetstream())
    publisher.start()
    for event in events:
        publisher.emit(event)
    assert await publisher.flush(20.0)
    await publisher.close()


def no_ack_pending(nc: NATS) -> Any:
    async def check() -> bool:
        info = await nc.jetstream().consumer_info("KEYVEIL_USAGE", "auditor-usage")
        return info.num_ack_pending == 0 and info.num_pending == 0

    return check


async def test_every_detector_through_real_nats(
    runtime: AuditorRuntime, pnc: NATS, inbox: AlertInbox
) -> None:
    now = T0 + 30 * 60
    baseline = normal_traffic(T0, 30)
    attacks: list[Event] = [
        *(denied("signature", ts=now + i * 0.1, ip="203.0.113.66") for i in range(12)),
        *(denied("replay", ts=now + 5 + i, token_id="tok-stolen") for i in range(3)),
        rotation_due(ts=now),
    ]
    await publish(pnc, [*baseline, *attacks])
    usage = runtime.consumers[0]
    await until(lambda: len(usage.seen) == len(baseline) + 15)
    await inbox.wait_for("rotation_overdue")
    await inbox.wait_for("replay_attempts")
    burst = await inbox.wait_for("auth_failure_burst")
    assert burst.labels["client_ip"] == "203.0.113.66"
    await runtime.publisher.flush()
    # Bad signatures are also tampering; the quiet baseline added nothing.
    assert inbox.types == [
        "auth_failure_burst",
        "replay_attempts",
        "rotation_overdue",
        "tampering_attempts",
    ]
    # The alerts are also kept in the KEYVEIL_ALERTS stream for `keyveil alerts tail`.
    info = await pnc.jetstream().stream_info("KEYVEIL_ALERTS")
    assert info.state.messages == 4


async def test_same_event_delivered_three_times_counts_once(
    runtime: AuditorRuntime, pnc: NATS, inbox: AlertInbox
) -> None:
    js = pnc.jetstream()
    events = [denied("invalid_token", ts=T0 + i, ip="192.0.2.9") for i in range(9)]
    for event in events:  # three copies of each in the stream (distinct Nats-Msg-Id)
        for copy in range(3):
            await js.publish(
                event.subject,
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": f"{event.event_id}-{copy}"},
            )
    usage = runtime.consumers[0]
    await until(lambda: len(usage.seen) == 9)
    await until(no_ack_pending(pnc))
    # 9 distinct failures < threshold 10: 27 deliveries must not look like 27 failures.
    await asyncio.sleep(0)  # let any (wrong) alert publish reach the inbox
    await runtime.publisher.flush()
    assert inbox.alerts == []
    await publish(pnc, [denied("invalid_token", ts=T0 + 20, ip="192.0.2.9")])
    alert = await inbox.wait_for("auth_failure_burst")
    assert alert.summary.startswith("10 failed")


async def test_failed_handling_is_redelivered_and_not_lost(pnc: NATS) -> None:
    handled: list[str] = []
    failures = {"left": 2}

    async def flaky(event: UsageEvent, _: Msg) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("downstream hiccup")
        handled.append(event.event_id)

    consumer: DurableConsumer[UsageEvent] = DurableConsumer(
        pnc.jetstream(),
        stream=USAGE_STREAM,
        durable="auditor-usage",
        model=UsageEvent,
        handler=flaky,
        ack_wait_s=5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    event = denied("signature", ts=T0)
    await publish(pnc, [event])
    await until(lambda: handled == [event.event_id])
    # Garbage is terminated, not redelivered forever.
    await pnc.jetstream().publish("keyveil.usage.proxy", b"not json")
    await until(no_ack_pending(pnc))
    stop.set()
    await task
    info = await pnc.jetstream().consumer_info("KEYVEIL_USAGE", "auditor-usage")
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert handled == [event.event_id]


async def test_audit_events_are_chained_into_the_ledger(runtime: AuditorRuntime, pnc: NATS) -> None:
    from shared.events import AuditEvent

    events = [
        AuditEvent(service="keymanager", type="lease_granted", actor="proxy", key_id="k1")
        for _ in range(5)
    ]
    await publish(pnc, events)
    audit = runtime.consumers[1]
    await until(lambda: len(audit.seen) == 5)
    stored = [item async for item in read_stream(pnc.jetstream(), "KEYVEIL_AUDIT_LEDGER")]
    published = [item async for item in read_stream(pnc.jetstream(), "KEYVEIL_AUDIT")]
    # The ledger holds every audit event once, in the audit stream's order.
    assert [json.loads(raw)["event"]["event_id"] for _, raw in stored] == [
        json.loads(raw)["event_id"] for _, raw in published
    ]
    assert {json.loads(raw)["event"]["event_id"] for _, raw in stored} == {
        e.event_id for e in events
    }
    assert runtime.auditor.ledger is not None
    assert verify_chain(stored, verifier=runtime.auditor.ledger.verifier).ok
    assert {json.loads(raw)["subject"] for _, raw in stored} == {"keyveil.audit.keymanager"}
    # The audit stream itself stays append-only.
    assert (await pnc.jetstream().stream_info("KEYVEIL_AUDIT")).config.deny_delete
    assert AUDIT_STREAM.deny_purge


@pytest.mark.slow
async def test_events_sent_while_stopped_alert_after_restart(
    private_nats: ServerProcess, pnc: NATS, inbox: AlertInbox, tmp_path: Path
) -> None:
    service = ServiceProcess(
        "auditor",
        env={
            "NATS_URL": private_nats.url,
            "AUDITOR_AUTH_FAILURE_THRESHOLD": "10",
            "LOG_LEVEL": "INFO",
        },
        log_path=tmp_path / "auditor.log",
    )
    service.start()
    try:
        service.stop()  # the durable consumer now exists; the auditor is down
        # uvicorn re-raises SIGTERM after its shutdown; what matters is that it finished.
        assert "Application shutdown complete" in service.log(), service.log()[-2000:]
        now = time.time()
        await publish(
            pnc,
            [
                *(denied("invalid_token", ts=now + i * 0.01, ip="203.0.113.99") for i in range(12)),
                rotation_due(ts=now),
            ],
        )
        await asyncio.sleep(0)
        assert inbox.alerts == []
        service.start()
        burst = await inbox.wait_for("auth_failure_burst", timeout=30)
        await inbox.wait_for("rotation_overdue", timeout=30)
        assert burst.labels["client_ip"] == "203.0.113.99"
        ledger = await pnc.jetstream().stream_info("KEYVEIL_AUDIT_LEDGER")
        assert ledger.state.messages == 1
    finally:
        service.stop()
    assert "Traceback" not in service.log()
