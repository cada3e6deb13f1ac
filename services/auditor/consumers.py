"""Durable JetStream pull consumers with explicit acks and idempotent handling.

Outcomes per message: ack after the handler succeeded (or the event was already
handled: its id is in the recent-ids window), nak with a delay when the handler
failed (redelivered up to max_deliver), term when the payload is not an event at
all or the handler refused it (`RefuseEvent`): redelivery cannot fix either. The
durable consumer remembers its position in the stream, so events published while
the auditor was down are delivered when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from shared.events import Event
from shared.telemetry import extract_context

__all__ = ["DurableConsumer", "RefuseEvent", "SeenIds"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

PROCESSED = Counter(
    "keyveil_auditor_events_processed_total", "Events handled and acknowledged", ["stream"]
)
DUPLICATES = Counter(
    "keyveil_auditor_events_duplicate_total",
    "Redelivered events already handled (acked, not counted again)",
    ["stream"],
)
INVALID = Counter(
    "keyveil_auditor_events_invalid_total", "Messages that were not valid events", ["stream"]
)
FAILED = Counter(
    "keyveil_auditor_events_failed_total",
    "Handler failures (event nak'ed for redelivery)",
    ["stream"],
)
LAG = Histogram(
    "keyveil_auditor_event_lag_seconds",
    "Time from an event's creation to the auditor handling it",
    ["stream"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
REFUSED = Counter(
    "keyveil_auditor_events_refused_total",
    "Valid events the handler refused (terminated, never redelivered)",
    ["stream"],
)
PENDING = Gauge(
    "keyveil_auditor_consumer_pending_messages",
    "Messages in the stream not yet delivered to the auditor",
    ["stream"],
)


class RefuseEvent(Exception):
    """Raised by a handler for an event that must never be processed: the message is termed."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class SeenIds:
    """The ids handled most recently (a bounded window, oldest forgotten first)."""

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


Handler = Callable[[E, Msg], Awaitable[None]]


class DurableConsumer(Generic[E]):
    """One durable pull consumer on one stream, feeding typed events to a handler."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: StreamConfig,
        durable: str,
        model: type[E],
        handler: Handler[E],
        ack_wait_s: float = 30.0,
        max_deliver: int = 10,
        batch: int = 256,
        seen_capacity: int = 200_000,
    ) -> None:
        self._js = js
        self._stream = stream
        self.stream_name = stream.name or ""
        self.durable = durable
        self._model = model
        self._handler = handler
        self._batch = batch
        self._config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=max(batch * 4, 1000),
            # As many replicas as the stream: an R1 consumer on a dead node stops the auditor.
            num_replicas=stream.num_replicas,
        )
        self.seen = SeenIds(seen_capacity)
        self.bound = False
        self._tracer = trace.get_tracer("keyveil.auditor")

    async def run(self, stop: asyncio.Event) -> None:
        """Bind (waiting for the stream to exist), then fetch and handle until `stop`."""
        sub = await self._bind(stop)
        if sub is None:
            return
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self._batch, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):  # fetch raises either
                    continue
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.warning("fetch from %s failed (%s)", self.stream_name, type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self.handle(msg)
                if msgs:
                    PENDING.labels(self.stream_name).set(msgs[-1].metadata.num_pending)
        finally:
            self.bound = False
            # A pull subscription left open would hold the connection's drain for its
            # whole timeout; the durable consumer itself stays on the server.
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await sub.unsubscribe()

    async def _bind(self, stop: asyncio.Event) -> JetStreamContext.PullSubscription | None:
        delay = 0.2
        while not stop.is_set():
            try:
                # The stream is made by `keyveil bootstrap`; until then, keep waiting.
                sub = await self._js.pull_subscribe(
                    (self._stream.subjects or [">"])[0],
                    durable=self.durable,
                    stream=self.stream_name,
                    config=self._config,
                )
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning(
                    "cannot bind %s on %s yet (%s); retrying",
                    self.durable,
                    self.stream_name,
                    type(exc).__name__,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            self.bound = True
            log.info("consuming %s as %s", self.stream_name, self.durable)
            return sub
        return None

    async def handle(self, msg: Msg) -> None:
        """Validate, de-duplicate, hand to the handler in the producer's trace, then ack."""
        try:
            event = self._model.model_validate_json(msg.data)
        except ValidationError:
            INVALID.labels(self.stream_name).inc()
            log.warning("not a %s on %s; terminated", self._model.__name__, self.stream_name)
            await msg.term()
            return
        if event.event_id in self.seen:
            DUPLICATES.labels(self.stream_name).inc()
            await msg.ack()
            return
        with self._tracer.start_as_current_span(
            f"auditor consume {self.stream_name}",
            context=extract_context(msg.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "nats", "messaging.destination.name": msg.subject},
        ):
            try:
                await self._handler(event, msg)
            except RefuseEvent as refused:
                REFUSED.labels(self.stream_name).inc()
                log.warning(
                    "%s refused on %s (%s); terminated", event.type, self.stream_name, refused.code
                )
                # Not added to `seen`: a forged copy must not shadow the genuine event's id.
                await msg.term()
                return
            except Exception:
                FAILED.labels(self.stream_name).inc()
                log.exception("handling %s from %s failed; nak", event.type, self.stream_name)
                await msg.nak(delay=1.0)
                return
        self.seen.add(event.event_id)
        PROCESSED.labels(self.stream_name).inc()
        LAG.labels(self.stream_name).observe(max(time.time() - event.ts, 0.0))
        await msg.ack()
