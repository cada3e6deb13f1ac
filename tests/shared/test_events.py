"""Events reach JetStream once, survive a NATS outage and a missing stream, and overflow is
counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from keyveil.servers import bootstrap_nats, start_nats
from shared.events import EVENTS_DROPPED, AuditEvent, EventPublisher, UsageEvent


async def _stream_count(nc: NATS, name: str) -> int:
    info = await nc.jetstream().stream_info(name)
    return int(info.state.messages)


async def _count_events(nc: NATS, subject: str, ids: set[str]) -> int:
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    seen: set[str] = set()
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            event = UsageEvent.model_validate_json(msg.data)
            if event.event_id in ids:
                seen.add(event.event_id)
    except nats.errors.TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return len(seen)


async def test_events_are_published_with_their_subject_and_deduplicated(nc: NATS) -> None:
    publisher = EventPublisher(nc.jetstream())
    publisher.start()
    usage = UsageEvent(service="harness", type="proxy.request", status=200)
    audit = AuditEvent(service="harness", type="key.stored", actor="test")
    publisher.emit(usage)
    publisher.emit(usage)  # a retry of the same event: same Nats-Msg-Id
    publisher.emit(audit)
    assert await publisher.flush(5)
    await publisher.close()
    assert await _count_events(nc, "keyveil.usage.harness", {usage.event_id}) == 1
    audit_msg = await nc.jetstream().get_last_msg("KEYVEIL_AUDIT", "keyveil.audit.harness")
    assert AuditEvent.model_validate_json(audit_msg.data).event_id == audit.event_id
    info = await nc.jetstream().stream_info("KEYVEIL_AUDIT")
    assert info.config.deny_delete
    assert info.config.deny_purge


async def test_events_wait_out_a_nats_outage(tmp_path: Path) -> None:
    server = start_nats(tmp_path, streams=True)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    publisher = EventPublisher(nc.jetstream(), publish_timeout_s=0.5)
    publisher.start()
    try:
        first = UsageEvent(service="outage", type="proxy.request")
        publisher.emit(first)
        assert await publisher.flush(5)

        server.kill()
        during = [UsageEvent(service="outage", type="proxy.request") for _ in range(20)]
        for event in during:
            publisher.emit(event)
        await asyncio.sleep(1.0)
        assert publisher.pending == 20  # kept, not lost

        server.start()  # same port, same JetStream store
        assert await publisher.flush(15)
        ids = {e.event_id for e in during} | {first.event_id}
        assert await _count_events(nc, "keyveil.usage.outage", ids) == 21
    finally:
        await publisher.close(1)
        await nc.close()
        server.stop()


async def test_events_wait_for_a_missing_stream(tmp_path: Path) -> None:
    """JetStream refuses (no stream yet: services never create one): kept, then published."""
    server = start_nats(tmp_path)  # JetStream on, no keyveil streams
    nc = await nats.connect(server.url)
    publisher = EventPublisher(nc.jetstream(), publish_timeout_s=0.5)
    publisher.start()
    try:
        events = [UsageEvent(service="nostream", type="proxy.request") for _ in range(3)]
        for event in events:
            publisher.emit(event)
        await asyncio.sleep(0.5)
        assert publisher.pending == 3
        bootstrap_nats(server.url)
        assert await publisher.flush(10)
        ids = {e.event_id for e in events}
        assert await _count_events(nc, "keyveil.usage.nostream", ids) == 3
    finally:
        await publisher.close(1)
        await nc.close()
        server.stop()


async def test_overflow_drops_oldest_and_counts(nc: NATS) -> None:
    publisher = EventPublisher(nc.jetstream(), max_buffer=3)  # not started: nothing drains
    before = EVENTS_DROPPED.labels("KEYVEIL_USAGE")._value.get()
    for _ in range(5):
        publisher.emit(UsageEvent(service="overflow", type="proxy.request"))
    assert publisher.pending == 3
    assert EVENTS_DROPPED.labels("KEYVEIL_USAGE")._value.get() - before == 2
