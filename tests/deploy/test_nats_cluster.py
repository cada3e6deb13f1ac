"""Multi-node rehearsal: a 3-node JetStream cluster (R3 streams) loses a node mid-traffic.

Events are published through the same EventPublisher every service uses and read by a
durable pull consumer like the auditor's; every event must arrive exactly once by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from keyveil.servers import bootstrap_nats, start_nats_cluster
from shared.events import EventPublisher, UsageEvent
from tests.stack import Traffic, backlog, operator_nats, read_stream, running_stack
from tests.support import until as _until

pytestmark = pytest.mark.slow

TOTAL = 300
KILL_AT = 100


async def _wait_for_meta_leader(nc: nats.aio.client.Client, timeout: float = 30.0) -> None:
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await js.account_info()
            return
        except (nats.js.errors.Error, nats.errors.Error):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.25)


async def test_no_event_lost_when_a_node_dies(tmp_path: Path) -> None:
    servers = start_nats_cluster(tmp_path, nodes=3)
    urls = [s.url for s in servers]
    options = {"servers": urls, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.2}
    publisher_nc = await nats.connect(**options)
    consumer_nc = await nats.connect(**options)
    try:
        await _wait_for_meta_leader(publisher_nc)
        bootstrap_nats(",".join(urls), replicas=3)
        publisher = EventPublisher(publisher_nc.jetstream(), publish_timeout_s=1)
        publisher.start()
        first = UsageEvent(service="cluster", type="proxy.request")
        publisher.emit(first)
        assert await publisher.flush(30)

        js = consumer_nc.jetstream()
        info = await js.stream_info("KEYVEIL_USAGE")
        assert info.config.num_replicas == 3
        consumer = await js.pull_subscribe(
            "keyveil.usage.cluster",
            durable="rehearsal",
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=5, num_replicas=3),
        )
        received: set[str] = set()
        deliveries = 0

        async def consume() -> None:
            nonlocal deliveries
            while True:
                try:
                    msgs = await consumer.fetch(50, timeout=1)
                except (TimeoutError, nats.js.errors.Error, nats.errors.Error):
                    continue
                for msg in msgs:
                    deliveries += 1
                    received.add(UsageEvent.model_validate_json(msg.data).event_id)
                    with contextlib.suppress(nats.errors.Error):
                        await msg.ack()

        reader = asyncio.create_task(consume())
        sent = {first.event_id}
        for i in range(1, TOTAL):
            if i == KILL_AT:
                servers[0].kill()  # a member (possibly the leader) of every R3 group dies
            event = UsageEvent(service="cluster", type="proxy.request")
            sent.add(event.event_id)
            publisher.emit(event)
            await asyncio.sleep(0.005)
        assert await publisher.flush(45), f"{publisher.pending} events never acknowledged"

        deadline = asyncio.get_running_loop().time() + 45
        while received != sent and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        reader.cancel()
        # nats-py's fetch can turn the cancellation into a TimeoutError (wait_for, 3.11).
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await reader
        await publisher.close(1)

        assert received == sent, f"lost {len(sent - received)} of {len(sent)} events"
        state = (await js.stream_info("KEYVEIL_USAGE")).state
        assert state.messages == TOTAL  # retries were deduplicated by Nats-Msg-Id
    finally:
        for nc in (publisher_nc, consumer_nc):
            with contextlib.suppress(Exception):
                await nc.close()
        for server in servers:
            server.stop()


async def test_services_lose_nothing_when_a_cluster_node_dies(tmp_path: Path) -> None:
    """The four services on the 3-node cluster (R3 streams and key bucket), one node killed."""
    servers = start_nats_cluster(tmp_path / "cluster", nodes=3)
    env = {
        "NATS_URL": ",".join(s.url for s in servers),
        "JETSTREAM_REPLICAS": "3",
        "KEYMANAGER_KV_REPLICAS": "3",
        "VOICE_AGENT_PROXY_RATE_LIMIT": "100000",
        "VOICE_AGENT_RATE_LIMIT": "10000",
    }
    probe = await nats.connect(servers=[s.url for s in servers])
    await _wait_for_meta_leader(probe)
    await probe.close()
    (tmp_path / "stack").mkdir()
    try:
        with running_stack(tmp_path / "stack", env=env) as stack:
            traffic = Traffic(stack)
            thread = threading.Thread(target=traffic.run)
            thread.start()
            try:
                await _until(lambda: traffic.ok() >= 20, timeout=45.0)
                servers[0].kill()
                killed_at = len(traffic.answers)
                await asyncio.sleep(6)
                await _until(lambda: traffic.ok() >= killed_at + 20, timeout=45.0)
            finally:
                traffic.stop.set()
                thread.join(15)

            nc = await operator_nats(stack)
            try:
                # The killed node may have led the meta group or a stream: JetStream
                # answers "unavailable" or not at all until the survivors elect anew.
                usage = audit = (1, 0)
                answered: set[str] = set()
                measured = False
                ok = traffic.ok()
                deadline = asyncio.get_running_loop().time() + 60
                while asyncio.get_running_loop().time() < deadline:
                    try:
                        info = await nc.jetstream().stream_info("KEYVEIL_USAGE")
                        raw = await read_stream(nc, "keyveil.usage.proxy")
                        answered = {e.event_id for e in map(UsageEvent.model_validate_json, raw)
                                    if e.status == 200}  # fmt: skip
                        usage = await backlog(nc, "KEYVEIL_USAGE", "auditor-usage")
                        audit = await backlog(nc, "KEYVEIL_AUDIT", "auditor-audit")
                        audited = len(await read_stream(nc, "keyveil.audit.>"))
                        ledger = (await nc.jetstream().stream_info("KEYVEIL_AUDIT_LEDGER")).state
                    except (nats.errors.Error, nats.js.errors.Error):
                        await asyncio.sleep(0.5)
                        continue
                    measured = True
                    caught_up = usage[1] >= usage[0] and audit[1] >= audit[0]
                    if len(answered) >= ok and caught_up and ledger.messages == audited:
                        break
                    await asyncio.sleep(0.5)
                assert measured, "JetStream never answered after the node was killed"
                assert info.config.num_replicas == 3
                assert len(answered) >= ok, f"{ok - len(answered)} usage events lost"
                assert usage[1] >= usage[0], "auditor did not process every usage event"
                assert audit[1] >= audit[0], "auditor did not process every audit event"
                # Every audit event reached the hash-chained ledger too.
                assert ledger.messages == audited
            finally:
                await nc.close()
            failures = {status for *_, status in traffic.answers if status != 200}
            assert failures <= {0, 502, 503, 504}
    finally:
        for server in servers:
            server.stop()
