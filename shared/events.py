"""Usage, audit and alert events: typed models, their subjects and streams, and a publisher.

Schema is versioned (`schema_version`, 2: a typed `reason` and `detail`, shared.eventschema);
consumers ignore fields they do not know and still read version 1 events.
The publisher never blocks a request: events go into a bounded buffer and a background
task publishes them to JetStream in batches, acks collected off the request path, with
`Nats-Msg-Id` = event id, so a retry after a lost ack is deduplicated by the stream. While
JetStream is unreachable (or a stream is missing: services never create streams, `keyveil
bootstrap` does) events wait in the buffer; only when it is full is the oldest dropped,
and counted. With an outbox directory (shared.outbox) the buffer also survives kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from opentelemetry import trace
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
from shared.outbox import Outbox, Segment
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
_PUBLISHED_BY_PREFIX = {
    prefix: EVENTS_PUBLISHED.labels(stream.name) for prefix, stream in _STREAM_OF.items()
}


class _Outgoing:
    """An event on its way: what is sent, and what to settle once JetStream has it."""

    __slots__ = ("headers", "payload", "prefix", "segment", "subject")

    def __init__(
        self,
        prefix: str,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        segment: Segment | None,
    ) -> None:
        self.prefix = prefix
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.segment = segment


class EventPublisher:
    """Buffers events and publishes them to JetStream in the background, acks off the path.

    A round publishes up to `batch_size` buffered events as plain messages, each with its
    own reply subject under one wildcard inbox subscription, and then waits once for all
    their acks (or `publish_timeout_s`): no request/reply future per event. Events without
    an ack (timeout, error, NATS away) go back to the front of the buffer and are sent
    again after a backoff with the same Msg-Id, so a lost ack costs a deduplicated copy.

    With `outbox_dir` every event is also written to a local outbox file (shared.outbox)
    when emitted, and replayed at the next start if this process dies before the ack.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_buffer: int = 10_000,
        publish_timeout_s: float = 2.0,
        batch_size: int = 512,
        linger_s: float = 0.005,
        outbox_dir: Path | None = None,
    ) -> None:
        self._js = js
        # The context keeps its connection private; plain publishes need the connection.
        self._nc = js._nc
        self._buffer: deque[_Outgoing] = deque()
        self._max_buffer = max_buffer
        self._timeout = publish_timeout_s
        self._batch_size = batch_size
        self._linger = linger_s
        self._outbox = Outbox(outbox_dir) if outbox_dir is not None else None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inbox = ""
        self._sub: Subscription | None = None
        self._sequence = 0
        self._waiting: dict[str, _Outgoing] = {}  # reply subject -> event awaiting its ack
        self._rejected: list[_Outgoing] = []
        self._round_done: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._closing = False

    def emit(self, event: Event) -> None:
        """Queue an event (and write it to the outbox); never blocks and never raises."""
        if len(self._buffer) >= self._max_buffer:
            self._drop(self._buffer.popleft())
        # Serialized here, once: the outbox line and the message are the same bytes.
        payload = event.__pydantic_serializer__.to_json(event)
        # The request's trace context, captured now: the publishing task runs outside it.
        # Without a recording span there is none to carry (and the propagators cost µs).
        traced = trace.get_current_span().get_span_context().is_valid
        headers: dict[str, str] = dict(inject_context({})) if traced else {}
        headers["Nats-Msg-Id"] = event.event_id
        subject = event.subject
        segment = self._outbox.append(subject, event.event_id, payload) if self._outbox else None
        self._buffer.append(_Outgoing(event.subject_prefix, subject, payload, headers, segment))
        self._wake.set()  # the gauge of buffered events is set by the publishing rounds

    def _drop(self, dropped: _Outgoing) -> None:
        EVENTS_DROPPED.labels(_STREAM_OF[dropped.prefix].name).inc()
        if dropped.segment is not None and self._outbox is not None:
            self._outbox.settle(dropped.segment)

    def start(self) -> None:
        """Replay what a dead predecessor left in the outbox, then publish in the background."""
        if self._outbox is not None:
            replayed = self._outbox.claim_orphans(self._max_buffer)
            for old in reversed(replayed):
                prefix = ".".join(old.subject.split(".", 2)[:2])
                if prefix not in _STREAM_OF:  # not an event subject: nothing to replay
                    self._outbox.settle(old.segment)
                    continue
                headers = {"Nats-Msg-Id": old.msg_id}  # the trace context is not kept
                item = _Outgoing(prefix, old.subject, old.payload, headers, old.segment)
                if len(self._buffer) >= self._max_buffer:
                    self._drop(item)
                else:
                    self._buffer.appendleft(item)
            EVENTS_BUFFERED.set(len(self._buffer))
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
        """Publish what is buffered (bounded by `timeout`), then stop the background task.

        What is still unpublished stays in the outbox (if any) for the next start.
        """
        await self.flush(timeout)
        self._closing = True
        self._stop.set()
        self._wake.set()
        if self._task:
            # Signalled first: a cancellation can be swallowed by a NATS call completing
            # at that moment, and the loop would then wait on `_wake` for ever.
            _, pending = await asyncio.wait({self._task}, timeout=1.0)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
        if self._outbox is not None:
            self._outbox.close()
        if self.pending:
            where = "kept in the outbox" if self._outbox else "lost"
            log.warning("%d events not published at shutdown (%s)", self.pending, where)

    async def _run(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        backoff = 0.1
        while not self._closing:
            if not self._buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger and len(self._buffer) < self._batch_size:
                # A moment for more events to join: one round (one socket write, one read of
                # acks) costs about as much CPU for one event as for dozens.
                await asyncio.sleep(self._linger)
            size = min(self._batch_size, len(self._buffer))
            EVENTS_BUFFERED.set(len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(size)]
            self._in_flight = len(batch)
            failed, reason = await self._send(batch)
            self._in_flight = 0
            self._buffer.extendleft(reversed(failed))
            EVENTS_BUFFERED.set(len(self._buffer))
            if failed:
                log.warning("%d events not published (%s); will retry", len(failed), reason)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1

    async def _send(self, batch: list[_Outgoing]) -> tuple[list[_Outgoing], str]:
        """Publish `batch`, wait for its acks; the events without one, and why."""
        if not self._nc.is_connected:
            # Not into the client's reconnect buffer: each retry would add a copy there.
            return batch, "not connected"
        waiting = self._waiting
        failed: list[_Outgoing] = []
        reason = "no ack in time"
        for index, item in enumerate(batch):
            self._sequence += 1
            reply = f"{self._inbox}.{self._sequence}"
            waiting[reply] = item
            try:
                await self._nc.publish(
                    item.subject, item.payload, reply=reply, headers=item.headers
                )
            except NatsError as exc:
                del waiting[reply]
                failed = batch[index:]
                reason = type(exc).__name__
                break
        if waiting:
            # A future and a timer rather than wait_for: no task per round.
            loop = asyncio.get_running_loop()
            done = self._round_done = loop.create_future()
            timer = loop.call_later(self._timeout, _resolve, done)
            try:
                await done
            finally:
                timer.cancel()
                self._round_done = None
        if self._rejected:
            reason = "refused by JetStream"
        failed.extend(self._rejected)
        failed.extend(waiting.values())
        self._rejected = []
        waiting.clear()
        return failed, reason

    async def _on_ack(self, msg: Msg) -> None:
        item = self._waiting.pop(msg.subject, None)
        if item is None:
            return  # late: the event went back to the buffer and its copy is deduplicated
        # No stream on the subject: the server answers 503 with no body.
        if (msg.headers and msg.headers.get("Status") == "503") or b'"error"' in msg.data:
            self._rejected.append(item)
        else:
            _PUBLISHED_BY_PREFIX[item.prefix].inc()
            if item.segment is not None and self._outbox is not None:
                self._outbox.settle(item.segment)
        if not self._waiting and self._round_done is not None:
            _resolve(self._round_done)

    async def publish_now(self, event: Event) -> None:
        """Publish one event and wait for JetStream's ack; raises on failure.

        For callers that move a watermark only after the ack (the voice usage outbox).
        """
        headers = dict(inject_context({}))
        headers["Nats-Msg-Id"] = event.event_id
        await self._js.publish(
            event.subject,
            event.__pydantic_serializer__.to_json(event),
            timeout=self._timeout,
            headers=headers,
        )
        _PUBLISHED_BY_PREFIX[event.subject_prefix].inc()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
