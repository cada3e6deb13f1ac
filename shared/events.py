"""Usage, audit and alert events: typed models, their subjects and streams, and a publisher.

Schema is versioned (`schema_version`, 2: a typed `reason` and `detail`, shared.eventschema);
consumers ignore fields they do not know and still read version 1 events.
The publisher never blocks a request: events go into a bounded buffer and a background
task publishes them to JetStream with `Nats-Msg-Id` = event id, so a retry after a lost
ack is deduplicated by the stream. While JetStream is unreachable (or a stream is missing:
services never create streams, `keyveil bootstrap` does) events wait in the buffer; only
when it is full is the oldest dropped, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    model_validator,
)

from shared.eventschema import (
    SCHEMA_VERSION,
    AuditDetail,
    Reason,
    StreamDrift,
    detail_from_v1,
    reason_from_v1,
)
from shared.streams import ALERTS_STREAM, AUDIT_STREAM, USAGE_STREAM, Drift
from shared.telemetry import inject_context

__all__ = [
    "ALERTS_STREAM",
    "AUDIT_STREAM",
    "SCHEMA_VERSION",
    "USAGE_STREAM",
    "AlertEvent",
    "AuditEvent",
    "Event",
    "EventPublisher",
    "UsageEvent",
    "drift_reporter",
]

log = logging.getLogger(__name__)

EVENTS_PUBLISHED = Counter(
    "keyveil_events_published_total", "Events acknowledged by JetStream", ["stream"]
)
EVENTS_DROPPED = Counter(
    "keyveil_events_dropped_total", "Events dropped because the buffer was full", ["stream"]
)
EVENTS_BUFFERED = Gauge("keyveil_events_buffered", "Events waiting to be published")


def _new_id() -> str:
    return uuid.uuid4().hex


def _before_v2(data: dict[str, Any]) -> bool:
    """Published by a v1 producer (or by one that did not say: read as v1, never refused)."""
    version = data.get("schema_version", 1)
    return not isinstance(version, int) or version < SCHEMA_VERSION


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(default_factory=_new_id)
    schema_version: int = SCHEMA_VERSION
    ts: float = Field(default_factory=time.time)
    service: str
    type: str

    subject_prefix: str = Field(default="", exclude=True)

    @property
    def subject(self) -> str:
        return f"{self.subject_prefix}.{self.service}"


class UsageEvent(Event):
    """What happened at an edge: an issuance, a proxied call, a denial, a limit hit."""

    subject_prefix: str = Field(default="keyveil.usage", exclude=True)

    outcome: Literal["ok", "denied", "error"] = "ok"
    reason: Reason | None = None
    """Why the outcome: a refusal (code and category), how it was served, ... (v2)."""
    status: int | None = None
    client_ip: str | None = None
    country: str | None = None
    token_id: str | None = None
    session_id: str | None = None
    key_id: str | None = None
    mode: str | None = None
    path: str | None = None
    model: str | None = None
    user: str | None = None  # a keyed hash of the user id (shared.principals), never the id
    app: str | None = None
    latency_ms: float | None = None
    upstream_latency_ms: float | None = None
    prompt_tokens: int | None = None  # every input token (cached and audio ones too)
    completion_tokens: int | None = None  # every output token (audio ones too)
    total_tokens: int | None = None
    # Parts of the above as the provider reported them (shared.metering), the billed
    # input characters (speech), and the cost by the price table (shared.pricing):
    # integer micro-dollars, None when the model is not in the table.
    cached_tokens: int | None = None
    audio_input_tokens: int | None = None
    cached_audio_tokens: int | None = None
    audio_output_tokens: int | None = None
    characters: int | None = None
    cost_micros: int | None = None
    price_version: str | None = None
    count: int | None = None
    """How many refusals this one event stands for (sampled refusals); None means one."""
    # Voice sessions (type "voice.usage"): billable seconds since the previous usage event
    # of the same session, the session's cumulative total, and the brokered session id.
    # A proxied transcription billed per minute carries its audio `seconds` too.
    seconds: float | None = None
    seconds_total: float | None = None
    voice_session_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_v1(cls, data: Any) -> Any:
        """A v1 event's free-string reason, as the typed reason it meant."""
        if isinstance(data, dict) and isinstance(data.get("reason"), str) and _before_v2(data):
            status = data.get("status")
            reason = reason_from_v1(
                data["reason"],
                outcome=str(data.get("outcome", "ok")),
                event_type=str(data.get("type", "")),
                status=status if isinstance(status, int) else None,
            )
            return {**data, "reason": reason}
        return data


class AuditEvent(Event):
    """A security-relevant action: who (service identity) did what to which key, and the outcome."""

    subject_prefix: str = Field(default="keyveil.audit", exclude=True)

    actor: str
    outcome: Literal["success", "denied", "failure"] = "success"
    key_id: str | None = None
    key_version: int | None = None
    provider: str | None = None
    environment: str | None = None
    detail: AuditDetail | None = None
    """What this type of action adds, typed by its `kind` (v2); None when nothing."""

    @model_validator(mode="before")
    @classmethod
    def _read_v1(cls, data: Any) -> Any:
        """A v1 event's free-form detail, as the model its type has; `{}` is no detail."""
        if isinstance(data, dict):
            detail = data.get("detail")
            if detail == {}:
                return {**data, "detail": None}
            if isinstance(detail, dict) and "kind" not in detail and _before_v2(data):
                upgraded = detail_from_v1(
                    str(data.get("type", "")), str(data.get("outcome", "success")), detail
                )
                return {**data, "detail": upgraded}
        return data

    @field_serializer("detail", mode="wrap")
    def _no_detail(self, value: Any, handler: SerializerFunctionWrapHandler) -> Any:
        # `{}`, not null: an auditor still on v1 (detail: dict) reads the event, so no
        # audit event misses the ledger while the services are upgraded one by one.
        return {} if value is None else handler(value)


class AlertEvent(Event):
    """An anomaly the auditor raised."""

    subject_prefix: str = Field(default="keyveil.alerts", exclude=True)

    severity: Literal["info", "warning", "critical"] = "warning"
    summary: str
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"{self.subject_prefix}.{self.type}"


_STREAM_OF = {
    "keyveil.usage": USAGE_STREAM,
    "keyveil.audit": AUDIT_STREAM,
    "keyveil.alerts": ALERTS_STREAM,
}


class EventPublisher:
    """Buffers events and publishes them to JetStream in the background."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_buffer: int = 10_000,
        publish_timeout_s: float = 2.0,
    ) -> None:
        self._js = js
        self._buffer: deque[Event] = deque()
        self._max_buffer = max_buffer
        self._timeout = publish_timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Trace context captured when an event is emitted (the request's span), since the
        # background publishing task runs outside that request's context.
        self._trace: dict[str, dict[str, str]] = {}
        self._in_flight = 0
        self._closing = False

    def emit(self, event: Event) -> None:
        """Queue an event; never blocks and never raises."""
        if len(self._buffer) >= self._max_buffer:
            dropped = self._buffer.popleft()
            self._trace.pop(dropped.event_id, None)
            EVENTS_DROPPED.labels(_STREAM_OF[dropped.subject_prefix].name).inc()
        carrier = dict(inject_context({}))
        if carrier:
            self._trace[event.event_id] = carrier
        self._buffer.append(event)
        EVENTS_BUFFERED.set(len(self._buffer))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    @property
    def pending(self) -> int:
        """Events not yet acknowledged by JetStream (buffered or in flight)."""
        return len(self._buffer) + self._in_flight

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the buffer is empty (or `timeout`); True when everything was published."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending and loop.time() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        return not self.pending

    async def close(self, timeout: float = 5.0) -> None:
        """Publish what is buffered (bounded by `timeout`), then stop the background task."""
        await self.flush(timeout)
        self._closing = True
        self._wake.set()
        if self._task:
            # Signalled first: a cancellation can be swallowed by a NATS call completing
            # at that moment, and the loop would then wait on `_wake` for ever.
            _, pending = await asyncio.wait({self._task}, timeout=1.0)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.pending:
            log.warning("%d events not published at shutdown", self.pending)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
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
            failed = [event for event, result in zip(batch, results, strict=True) if result]
            for event in reversed(failed):
                self._buffer.appendleft(event)
            EVENTS_BUFFERED.set(len(self._buffer))
            if failed:
                reason = next(type(r).__name__ for r in results if r)
                log.warning("%d events not published (%s); will retry", len(failed), reason)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1

    async def publish_now(self, event: Event) -> None:
        """Publish one event and wait for JetStream's ack; raises on failure.

        For callers that move a watermark only after the ack (the voice usage outbox).
        """
        await self._publish(event)

    async def _publish(self, event: Event) -> None:
        """Publish one event; raises on failure (the caller keeps it and retries)."""
        stream = _STREAM_OF[event.subject_prefix]
        headers = {**self._trace.get(event.event_id, {}), "Nats-Msg-Id": event.event_id}
        await self._js.publish(
            event.subject,
            event.model_dump_json().encode(),
            timeout=self._timeout,
            headers=headers,
        )
        self._trace.pop(event.event_id, None)
        EVENTS_PUBLISHED.labels(stream.name).inc()


def drift_reporter(publisher: EventPublisher, service: str) -> Callable[[list[Drift]], None]:
    """`StreamGuard.on_drift` for `service`: one audit event naming what drifted."""

    def report(drifts: list[Drift]) -> None:
        publisher.emit(
            AuditEvent(
                service=service,
                type="stream.drift",
                actor=service,
                outcome="failure",
                detail=StreamDrift(streams={d.stream: list(d.fields) for d in drifts}),
            )
        )

    return report
