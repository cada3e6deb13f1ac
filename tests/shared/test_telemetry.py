"""Structured logs never leak a secret, whatever the code path; traces follow a request
from the HTTP edge over NATS to the responder and through the usage event to the auditor."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from keyveil.servers import start_nats
from services.auditor.consumers import DurableConsumer
from shared import bus
from shared.events import USAGE_STREAM, EventPublisher, UsageEvent
from shared.httpedge import add_edge_routes
from shared.telemetry import (
    REDACTED,
    JsonFormatter,
    Redactor,
    configure_logging,
    configure_tracing,
    extract_context,
    inject_context,
    redactor,
)

PROVIDER_KEY = "sk-proj-AbCdEf0123456789ghijKLMNOPqrstuv"
REALTIME_SECRET = "ek_68a1b2c3d4e5f60718293a4b5c6d7e8f"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0b2stMSJ9.c2lnbmF0dXJlLXZhbHVlLWhlcmU"
CONFIG_SECRET = "kek-Zq8wN3vR5tY7uI9oP1aS2dF4gH6jK"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """configure_logging as a service does, with stderr swapped for a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("testsvc")
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_secrets_in_messages_args_extra_and_tracebacks_are_redacted(
    captured: io.StringIO,
) -> None:
    redactor.register(CONFIG_SECRET)
    log = logging.getLogger("keyveil.test")
    log.warning(f"upstream said no to {PROVIDER_KEY}")
    log.warning("client secret %s and token %s", REALTIME_SECRET, JWT)
    log.info("config", extra={"fields": {"kek": CONFIG_SECRET, "auth": f"Bearer {JWT}"}})
    try:
        raise ValueError(f"bad key {PROVIDER_KEY} with kek {CONFIG_SECRET}")
    except ValueError:
        log.exception("lease failed")
    text = captured.getvalue()
    for secret in (PROVIDER_KEY, REALTIME_SECRET, JWT, CONFIG_SECRET, "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in text
    entries = lines(captured)
    assert len(entries) == 4, "every line is one JSON object"
    assert entries[0]["msg"] == f"upstream said no to {REDACTED}"
    assert entries[1]["msg"] == f"client secret {REDACTED} and token {REDACTED}"
    assert entries[2]["kek"] == REDACTED
    assert "ValueError: bad key [REDACTED] with kek [REDACTED]" in str(entries[3]["exc"])
    assert {e["service"] for e in entries} == {"testsvc"}
    assert entries[3]["level"] == "error"


def test_text_format_is_redacted_too() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("testsvc", fmt="text")
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        logging.getLogger("x").error("key=%s", PROVIDER_KEY)
        assert PROVIDER_KEY not in stream.getvalue()
        assert REDACTED in stream.getvalue()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abcdefgh12345678",
        "authorization: bearer abcdefgh12345678",
        "Signature: sig1=:dGhpcyBpcyBhIHNpZ25hdHVyZQ==:",
        "sk-ant-api03-abcdefghijkl",
        "key sk-abcdefgh1234 end",
    ],
)
def test_secret_shapes(text: str) -> None:
    assert REDACTED in Redactor().redact(text)


def test_ordinary_text_is_left_alone() -> None:
    plain = "proxy.request 200 chat_completions in 12.5 ms for key key-openai-1 (sk- prefix)"
    assert Redactor().redact(plain) == plain


def test_short_values_are_not_registered() -> None:
    r = Redactor()
    r.register("abc", None, "")
    assert r.redact("abc") == "abc"


def test_json_formatter_adds_trace_id_inside_a_span(span_exporter: InMemorySpanExporter) -> None:
    formatter = JsonFormatter("svc")
    with trace.get_tracer("t").start_as_current_span("work") as span:
        record = logging.LogRecord("n", logging.INFO, __file__, 1, "hello", None, None)
        entry = json.loads(formatter.format(record))
    assert entry["trace_id"] == f"{span.get_span_context().trace_id:032x}"


def test_tracing_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert configure_tracing("svc") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert configure_tracing("svc") is None


def test_trace_context_round_trips_through_headers(span_exporter: InMemorySpanExporter) -> None:
    with trace.get_tracer("t").start_as_current_span("parent") as span:
        headers = dict(inject_context({}))
    assert headers["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}"
    ctx = extract_context(headers)
    assert trace.get_current_span(ctx).get_span_context().span_id == (
        span.get_span_context().span_id
    )
    assert extract_context(None) is not None


# --- one trace across HTTP, NATS request/reply and the usage event --------------------


@pytest.fixture(scope="module")
def span_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process-wide provider (installed once per process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = configure_tracing("tests", exporter=SimpleSpanExporterShim(exporter))
        assert provider is not None
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def SimpleSpanExporterShim(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    return exporter


@pytest.fixture
async def private_nc(tmp_path: Path) -> AsyncIterator[NATS]:
    server = start_nats(tmp_path, streams=True)
    client = await nats.connect(server.url)
    async with asyncio.timeout(10):
        while True:
            try:
                await client.jetstream().account_info()
                break
            except Exception:
                await asyncio.sleep(0.05)
    yield client
    await client.drain()
    server.stop()


class Ping(BaseModel):
    n: int


class Pong(BaseModel):
    n: int


async def test_one_trace_spans_http_edge_nats_responder_and_auditor(
    span_exporter: InMemorySpanExporter, private_nc: NATS
) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    span_exporter.clear()
    nc = private_nc
    publisher = EventPublisher(nc.jetstream())
    publisher.start()

    responder = bus.Responder(nc, {"token"})

    async def lease(msg: Msg) -> None:  # the key-manager side
        request = bus.parse_request(msg, Ping)
        await responder.reply(msg, Pong(n=request.n + 1))

    await nc.subscribe("keyveil.km.lease", cb=bus.traced_handler("keymanager", "km.lease", lease))

    app = FastAPI()  # FastAPI's own telemetry makes the server span from `traceparent`
    add_edge_routes(app, {})

    @app.post("/api/voice-agent/secure-token")
    async def issue() -> dict[str, int]:  # the token edge
        reply = await bus.request(
            nc, "keyveil.km.lease", Ping(n=1), Pong, timeout=5, requester="token"
        )
        publisher.emit(UsageEvent(service="token", type="token.issued", mode="proxy"))
        return {"n": reply.n}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://edge"
    ) as client:
        answer = await client.post("/api/voice-agent/secure-token")
    assert answer.json() == {"n": 2}
    assert await publisher.flush(10)

    handled: list[str] = []

    async def on_usage(event: UsageEvent, _: Msg) -> None:
        handled.append(event.type)

    consumer: DurableConsumer[UsageEvent] = DurableConsumer(
        nc.jetstream(), stream=USAGE_STREAM, durable="auditor-usage", model=UsageEvent,
        handler=on_usage,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    async with asyncio.timeout(15):
        while not handled:
            await asyncio.sleep(0.02)
    stop.set()
    await task
    await publisher.close()
    provider.force_flush()

    finished = span_exporter.get_finished_spans()
    spans: dict[str, ReadableSpan] = {s.name: s for s in finished}
    by_id = {s.context.span_id: s for s in finished if s.context is not None}

    def ancestors(span: ReadableSpan) -> list[str]:
        names = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    edge = spans["POST /api/voice-agent/secure-token"]
    responder = spans["km.lease"]
    audited = spans["auditor consume KEYVEIL_USAGE"]
    assert edge.kind == trace.SpanKind.SERVER
    assert edge.attributes is not None
    assert edge.attributes["http.response.status_code"] == 200
    assert edge.context is not None
    trace_id = edge.context.trace_id
    for span in (responder, audited):
        assert span.context is not None
        assert span.context.trace_id == trace_id
        assert edge.name in ancestors(span), (span.name, ancestors(span))
