"""Structured logs with redaction, and OpenTelemetry tracing across HTTP and NATS.

Redaction runs on the formatted line, whatever the code path, so a secret that slips
into a message, an argument or a traceback is masked before it reaches a handler.
Tracing is off unless the standard OTEL_* variables ask for an exporter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

__all__ = [
    "JsonFormatter",
    "Redactor",
    "configure_logging",
    "configure_tracing",
    "extract_context",
    "inject_context",
    "redactor",
]

REDACTED = "[REDACTED]"

# Shapes of secrets we must never print: provider keys, realtime client secrets,
# JWT-shaped tokens (our proxy tokens), bearer credentials and HMAC signatures.
_SECRET_SHAPES = (
    r"sk-[A-Za-z0-9_\-]{8,}",
    r"ek_[A-Za-z0-9_\-]{8,}",
    r"eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}",
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/\-]{8,}=*",
    r"sig1=:[A-Za-z0-9+/=]{8,}:",
)


class Redactor:
    """Masks known secret values and secret-shaped strings in text."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern = re.compile("|".join(_SECRET_SHAPES))

    def register(self, *values: str | None) -> None:
        """Remember exact secret values (configuration secrets) to mask wherever they appear."""
        for value in values:
            if value and len(value) >= 8:
                self._values.add(value)

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return self._pattern.sub(REDACTED, text)


redactor = Redactor()
"""The process-wide redactor: logging is process-wide too, so this is its one instance."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds structured fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redactor.redact(json.dumps(entry, default=str))


class _RedactingTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redactor.redact(super().format(record))


def configure_logging(service: str, *, level: str = "INFO", fmt: str = "json") -> None:
    """Send every log record to stderr through the redactor, as JSON or text."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            _RedactingTextFormatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print query strings; our edge logs requests itself.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def configure_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider | None:
    """Install a tracer provider when an exporter is given or OTEL_* variables ask for one."""
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "none").lower()
    if exporter is None and wanted in ("", "none"):
        return None
    if exporter is None:
        if wanted == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )

            exporter = OTLPSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME", f"keyveil-{service}")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def inject_context(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current W3C trace context into message headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """Read a W3C trace context from message headers (empty context when absent)."""
    return propagate.extract(dict(headers or {}))
