"""Auditor benchmark: events processed per second, and time from an attack burst's
first event to its alert on the bus. Real nats-server (JetStream), in-process auditor.

    .venv/bin/python -m benchmarks.auditor_bench [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from benchmarks.common import add_json_option, write_json
from keyveil.servers import start_nats
from services.auditor.app import start_runtime, stop_runtime
from services.auditor.settings import Settings
from shared.contract import Refusal
from shared.events import UsageEvent
from shared.eventschema import Refused
from shared.settings import load_settings


def traffic(count: int, start: float) -> list[UsageEvent]:
    events = []
    for i in range(count):
        ts = start + i * 0.01
        if i % 5 == 0:
            events.append(
                UsageEvent(service="token", type="token.issued", mode="proxy", ts=ts,
                           client_ip=f"198.51.100.{i % 200}")
            )  # fmt: skip
        else:
            events.append(
                UsageEvent(service="proxy", type="proxy.request", status=200, ts=ts,
                           key_id=f"key-{i % 3}", token_id=f"tok-{i % 500}", country="DE")
            )  # fmt: skip
    return events


async def publish_all(js: nats.js.JetStreamContext, events: list[UsageEvent]) -> None:
    for chunk in range(0, len(events), 500):
        await asyncio.gather(
            *(
                js.publish(e.subject, e.model_dump_json().encode(),
                           headers={"Nats-Msg-Id": e.event_id})
                for e in events[chunk : chunk + 500]
            )
        )  # fmt: skip


async def main(count: int, bursts: int) -> dict[str, float]:
    logging.basicConfig(level=logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="auditor-bench-"))
    server = start_nats(workdir, streams=True)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await asyncio.sleep(0.3)
    try:
        # 1. Throughput: a backlog the auditor drains from its durable consumer.
        await publish_all(js, traffic(count, time.time() - count * 0.01))
        settings = load_settings(Settings, nats_url=server.url, auth_failure_threshold=20)
        started = time.perf_counter()
        runtime = await start_runtime(settings)
        usage = runtime.consumers[0]
        while len(usage.seen) < count:  # noqa: ASYNC110 - polling is the measurement
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        print(
            f"throughput: {count} usage events in {elapsed:.2f}s = {count / elapsed:,.0f} events/s"
        )

        # 2. Detection latency: burst start -> alert on keyveil.alerts.auth_failure_burst.
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_alert(_: Msg) -> None:
            arrived.put_nowait(time.perf_counter())

        await nc.subscribe("keyveil.alerts.auth_failure_burst", cb=on_alert)
        latencies = []
        for n in range(bursts):
            ip = f"203.0.113.{n + 1}"
            burst = [
                UsageEvent(service="proxy", type="proxy.rejected", outcome="denied",
                           reason=Refused.of(Refusal.TOKEN_INVALID), client_ip=ip)
                for _ in range(settings.auth_failure_threshold)
            ]  # fmt: skip
            first = time.perf_counter()
            await publish_all(js, burst)
            alerted = await asyncio.wait_for(arrived.get(), 10)
            latencies.append((alerted - first) * 1000)
        print(
            f"attack burst -> alert ({settings.auth_failure_threshold} failures, {bursts} runs): "
            f"median {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms"
        )
        await stop_runtime(runtime)
    finally:
        await nc.close()
        server.stop()
    return {
        "events": count,
        "events_per_s": round(count / elapsed, 1),
        "alert_latency_median_ms": round(statistics.median(latencies), 2),
        "alert_latency_max_ms": round(max(latencies), 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--bursts", type=int, default=10)
    add_json_option(parser)
    args = parser.parse_args()
    write_json(args.json, asyncio.run(main(args.events, args.bursts)))
