"""NATS connection, typed request/reply, and idempotent JetStream set-up.

Replies are JSON models; a responder that refuses answers `{"error": {"code", "message"}}`,
which the requester raises as `RemoteError`. Trace context rides in message headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from pydantic import BaseModel, ValidationError

from shared.errors import BusError, BusTimeoutError, NoRespondersError
from shared.settings import CommonSettings
from shared.telemetry import extract_context, inject_context

__all__ = [
    "ErrorBody",
    "ErrorReply",
    "RemoteError",
    "connect",
    "ensure_stream",
    "parse_request",
    "reply_error",
    "reply_model",
    "request",
    "server_urls",
    "traced_handler",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorReply(BaseModel):
    """What a responder sends back instead of the reply model when it refuses."""

    error: ErrorBody


class RemoteError(BusError):
    """The responder answered with a typed error."""

    def __init__(self, subject: str, code: str, message: str) -> None:
        self.code = code
        super().__init__(subject, f"{code}: {message}")


def server_urls(nats_url: str) -> list[str]:
    """NATS_URL may list several cluster members, comma-separated; the client fails over."""
    return [url.strip() for url in nats_url.split(",") if url.strip()]


async def connect(
    settings: CommonSettings,
    *,
    name: str,
    connect_deadline_s: float = 30.0,
    on_state: Callable[[bool], None] | None = None,
) -> NATS:
    """Connect as this service's NATS user; retry until `connect_deadline_s`, then raise.

    Once connected the client reconnects forever; `on_state` hears each change so
    readiness can follow the connection.
    """

    async def disconnected() -> None:
        log.warning("nats disconnected")
        if on_state:
            on_state(False)

    async def reconnected() -> None:
        log.info("nats reconnected")
        if on_state:
            on_state(True)

    async def error(exc: Exception) -> None:
        log.warning("nats error: %s", type(exc).__name__)

    user = settings.nats_user
    options: dict[str, Any] = {
        "servers": server_urls(settings.nats_url),
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "drain_timeout": 10,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
        "inbox_prefix": f"_INBOX_{user}".encode() if user else b"_INBOX",
    }
    if user:
        options["user"] = user
        options["password"] = (
            settings.nats_password.get_secret_value() if settings.nats_password else ""
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_deadline_s
    delay = 0.2
    while True:
        try:
            nc = await nats.connect(**options)
        except (OSError, nats.errors.Error) as exc:
            if loop.time() + delay > deadline:
                raise BusError("connect", f"cannot reach NATS ({type(exc).__name__})") from None
            log.warning("nats not reachable yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if on_state:
            on_state(True)
        return nc


async def request(
    nc: NATS,
    subject: str,
    payload: BaseModel,
    reply_type: type[M],
    *,
    timeout: float,
) -> M:
    """Send `payload`, wait for a `reply_type`; raise a typed `BusError` otherwise."""
    headers = dict(inject_context({}))
    try:
        msg = await nc.request(
            subject, payload.model_dump_json().encode(), timeout=timeout, headers=headers
        )
    except nats.errors.NoRespondersError:
        raise NoRespondersError(subject, "no responders") from None
    except nats.errors.TimeoutError:
        raise BusTimeoutError(subject, f"no reply within {timeout:g}s") from None
    except nats.errors.Error as exc:
        raise BusError(subject, type(exc).__name__) from None
    if msg.data.startswith(b'{"error"'):
        failure = ErrorReply.model_validate_json(msg.data)
        raise RemoteError(subject, failure.error.code, failure.error.message)
    try:
        return reply_type.model_validate_json(msg.data)
    except ValidationError:
        raise BusError(subject, "malformed reply") from None


async def reply_model(msg: Msg, reply: BaseModel) -> None:
    await msg.respond(reply.model_dump_json().encode())


async def reply_error(msg: Msg, code: str, message: str) -> None:
    await reply_model(msg, ErrorReply(error=ErrorBody(code=code, message=message)))


def parse_request(msg: Msg, model: type[M]) -> M:
    """Validate a request body; raises pydantic's ValidationError for the handler to answer."""
    return model.model_validate_json(msg.data)


Handler = Callable[[Msg], Awaitable[None]]


def traced_handler(tracer_name: str, span_name: str, handler: Handler) -> Handler:
    """Wrap a NATS handler in a span that continues the requester's trace."""
    from opentelemetry import trace

    tracer = trace.get_tracer(tracer_name)

    async def wrapped(msg: Msg) -> None:
        with tracer.start_as_current_span(span_name, context=extract_context(msg.headers)):
            await handler(msg)

    return wrapped


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to `config`; safe on every start."""
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with another configuration (e.g. retention changed): converge.
        await js.update_stream(config)
