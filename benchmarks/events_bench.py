"""Event publishing cost: CPU microseconds per usage event in this process, and events/s.

Compares the former publisher (rounds of 64 `js.publish` calls, one request/reply future
and ack wait per event) with EventPublisher (plain publishes with reply subjects on one
inbox, acks collected off the path), with and without its local outbox file. Real
nats-server (JetStream, file storage). Two shapes:

- burst: N events emitted at once, then published (the publisher's best case);
- paced: events emitted at a steady rate in small groups, as a loaded proxy emits them
  ("harness only" is the pacing loop itself: subtract it from the others).

`emit` is what the request path pays (serialization moved there with the outbox write);
`total` adds the background publishing, both in CPU time of this process only.

    .venv/bin/python -m benchmarks.events_bench [--events 20000] [--rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import nats
from nats.js import JetStreamContext

from benchmarks.common import add_json_option, write_json
from keyveil.servers import start_nats
from shared.events import Event, EventPublisher, UsageEvent
from shared.outbox import Outbox
from shared.telemetry import inject_context

TEMPLATE = UsageEvent(
    service="proxy",
    type="proxy.request",
    status=200,
    client_ip="198.51.100.7",
    country="DE",
    token_id=uuid.uuid4().hex,
    session_id="sess-1a2b3c4d",
    key_id="key-openai-1",
    mode="proxy",
    path="chat/completions",
    model="gpt-4o-mini",
    app="bench",
    latency_ms=12.5,
    upstream_latency_ms=10.1,
    prompt_tokens=12,
    completion_tokens=40,
    total_tokens=52,
    cost_micros=31,
    price_version="2026-11",
)


class Publisher(Protocol):
    @property
    def pending(self) -> int: ...
    def emit(self, event: Event) -> None: ...
    def start(self) -> None: ...
    async def flush(self, timeout: float = 5.0) -> bool: ...
    async def close(self, timeout: float = 5.0) -> None: ...


class FormerPublisher:
    """The publishing loop EventPublisher had before batching (kept here for comparison)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._buffer: deque[Event] = deque()
        self._trace: dict[str, dict[str, str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0

    @property
    def pending(self) -> int:
        return len(self._buffer) + self._in_flight

    def emit(self, event: Event) -> None:
        carrier = dict(inject_context({}))
        if carrier:
            self._trace[event.event_id] = carrier
        self._buffer.append(event)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:  # noqa: ASYNC110 - as it was
            await asyncio.sleep(0.02)
        return not self.pending

    async def close(self, timeout: float = 5.0) -> None:
        await self.flush(timeout)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._buffer.popleft() for _ in range(min(64, len(self._buffer)))]
            self._in_flight = len(batch)
            results = await asyncio.gather(
                *(self._publish(event) for event in batch), return_exceptions=True
            )
            self._in_flight = 0
            for event, result in zip(batch, results, strict=True):
                if result:
                    self._buffer.appendleft(event)

    async def _publish(self, event: Event) -> None:
        headers = {**self._trace.pop(event.event_id, {}), "Nats-Msg-Id": event.event_id}
        await self._js.publish(
            event.subject, event.model_dump_json().encode(), timeout=2.0, headers=headers
        )


class NoPublisher(FormerPublisher):
    """Emits and forgets: what the harness itself costs, to subtract from the others."""

    def emit(self, event: Event) -> None:
        pass

    def start(self) -> None:
        pass


def _events(count: int) -> list[Event]:
    now = time.time()
    return [
        TEMPLATE.model_copy(update={"event_id": uuid.uuid4().hex, "ts": now}) for _ in range(count)
    ]


async def _burst(publisher: Publisher, events: list[Event]) -> dict[str, float]:
    publisher.start()
    await asyncio.sleep(0.1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for event in events:
        publisher.emit(event)
    cpu1 = time.process_time()
    assert await publisher.flush(120), "not everything was published"
    cpu2, wall2 = time.process_time(), time.perf_counter()
    await publisher.close()
    n = len(events)
    return {
        "emit_us": round((cpu1 - cpu0) / n * 1e6, 2),
        "total_us": round((cpu2 - cpu0) / n * 1e6, 2),
        "events_per_s": round(n / (wall2 - wall0), 0),
    }


async def _paced(publisher: Publisher, events: list[Event], rate: float) -> dict[str, float]:
    """Groups of 4 events every 4/rate seconds; CPU per event while keeping up."""
    publisher.start()
    await asyncio.sleep(0.1)
    group = 4
    interval = group / rate
    emit_cpu = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    next_at = wall0
    for start in range(0, len(events), group):
        c = time.process_time()
        for event in events[start : start + group]:
            publisher.emit(event)
        emit_cpu += time.process_time() - c
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    assert await publisher.flush(120), "not everything was published"
    cpu2, wall2 = time.process_time(), time.perf_counter()
    await publisher.close()
    n = len(events)
    return {
        "emit_us": round(emit_cpu / n * 1e6, 2),
        "total_us": round((cpu2 - cpu0) / n * 1e6, 2),
        "events_per_s": round(n / (wall2 - wall0), 0),
    }


def _request_path_parts(workdir: Path, count: int) -> dict[str, float]:
    """CPU of each step `emit` takes on the request path, in microseconds per event."""
    events = _events(count)
    c0 = time.process_time()
    payloads = [e.__pydantic_serializer__.to_json(e) for e in events]
    c1 = time.process_time()
    outbox = Outbox(workdir / "parts")
    for event, payload in zip(events, payloads, strict=True):
        outbox.append(event.subject, event.event_id, payload)
    c2 = time.process_time()
    outbox.close()
    parts = {
        "serialize_us": round((c1 - c0) / count * 1e6, 2),
        "outbox_append_us": round((c2 - c1) / count * 1e6, 2),
    }
    print(
        f"request path: serialize {parts['serialize_us']:.1f} us/event, "
        f"outbox write {parts['outbox_append_us']:.1f} us/event"
    )
    return parts


async def main(count: int, rate: float) -> dict[str, Any]:
    logging.basicConfig(level=logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="events-bench-"))
    server = start_nats(workdir, streams=True)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    makers: dict[str, Callable[[], Publisher]] = {
        "harness only (no publishing)": lambda: NoPublisher(js),
        "former (js.publish per event)": lambda: FormerPublisher(js),
        "batched, no linger": lambda: EventPublisher(js, max_buffer=count, linger_s=0),
        "batched": lambda: EventPublisher(js, max_buffer=count),
        "batched + outbox": lambda: EventPublisher(
            js, max_buffer=count, outbox_dir=workdir / "outbox"
        ),
    }
    results: dict[str, Any] = {"request_path": _request_path_parts(workdir, count)}
    try:
        for shape in ("burst", "paced"):
            n = count if shape == "burst" else max(1, min(count, int(rate * 5)))
            print(f"{shape}: {n} events" + (f" at {rate:,.0f}/s" if shape == "paced" else ""))
            for name, make in makers.items():
                events = _events(n)
                if shape == "burst":
                    numbers = await _burst(make(), events)
                else:
                    numbers = await _paced(make(), events, rate)
                results[f"{shape}/{name}"] = numbers
                print(
                    f"  {name:32} emit {numbers['emit_us']:6.1f} us/event  "
                    f"total {numbers['total_us']:6.1f} us/event  "
                    f"{numbers['events_per_s']:>9,.0f} events/s"
                )
    finally:
        await nc.close()
        server.stop()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=2_000, help="events/s of the paced shape")
    add_json_option(parser)
    args = parser.parse_args()
    write_json(args.json, asyncio.run(main(args.events, args.rate)))
