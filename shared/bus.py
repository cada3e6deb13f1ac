"""NATS connection and typed request/reply between keyveil services.

Replies are JSON models; a responder that refuses answers `{"error": {"code", "message"}}`,
which the requester raises as `RemoteError`. Trace context rides in request headers.

Replies go only to user-scoped inboxes (`_INBOX_<user>.rpc.<id>`): a requester asks on an inbox
of its own NATS user, and a responder (`Responder`) answers only inboxes of the users allowed
to ask, without copying any request header onto the reply. A request naming any other reply
subject (a KV subject, a stream subject, another user's inbox) is dropped unanswered, so a
responder can never be turned into a publisher of someone else's subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from shared.errors import BusError, BusTimeoutError, NoRespondersError
from shared.settings import CommonSettings
from shared.telemetry import extract_context, inject_context

__all__ = [
    "ErrorBody",
    "ErrorReply",
    "RemoteError",
    "Responder",
    "connect",
    "inbox_owner",
    "inbox_prefix",
    "parse_request",
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


# Request/reply between services uses `_INBOX_<user>.rpc.<id>`: the `rpc` token keeps
# these apart from the client library's own inboxes (JetStream acks arrive on
# `_INBOX_<user>.<nuid>...`), so a responder allowed to answer on `.rpc.>` can never
# forge an acknowledgement. No wildcards, no spaces, nothing else.
RPC_TOKEN = "rpc"  # noqa: S105 - a subject token, not a secret
_SCOPED_INBOX = re.compile(r"^_INBOX_([a-z][a-z0-9_-]{0,31})\.rpc\.[A-Za-z0-9_-]{1,64}$")


def inbox_prefix(user: str) -> str:
    """The inbox prefix of a NATS user: its replies arrive under `<prefix>.>` only."""
    return f"_INBOX_{user}"


def inbox_owner(reply: str | None) -> str | None:
    """The NATS user a reply subject belongs to, or None unless it is a scoped inbox."""
    if not reply:
        return None
    match = _SCOPED_INBOX.match(reply)
    return match.group(1) if match else None


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
        "inbox_prefix": inbox_prefix(user or name).encode(),
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
    requester: str,
) -> M:
    """Send `payload` from `requester`, wait for a `reply_type`; raise a typed `BusError`.

    The reply comes back on a fresh inbox of `requester` (`_INBOX_<requester>.rpc.<id>`),
    the only kind of reply subject a keyveil responder answers.
    """
    inbox = f"{inbox_prefix(requester)}.{RPC_TOKEN}.{uuid.uuid4().hex}"
    try:
        sub = await nc.subscribe(inbox, max_msgs=1)
    except nats.errors.Error as exc:
        raise BusError(subject, type(exc).__name__) from None
    try:
        await nc.publish(
            subject,
            payload.model_dump_json().encode(),
            reply=inbox,
            headers=dict(inject_context({})),
        )
        msg = await sub.next_msg(timeout=timeout)
    except nats.errors.TimeoutError:
        raise BusTimeoutError(subject, f"no reply within {timeout:g}s") from None
    except nats.errors.Error as exc:
        raise BusError(subject, type(exc).__name__) from None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    if msg.headers and msg.headers.get("Status") == "503":
        raise NoRespondersError(subject, "no responders")
    if msg.data.startswith(b'{"error"'):
        try:
            failure = ErrorReply.model_validate_json(msg.data)
        except ValidationError:
            raise BusError(subject, "malformed reply") from None
        raise RemoteError(subject, failure.error.code, failure.error.message)
    try:
        return reply_type.model_validate_json(msg.data)
    except ValidationError:
        raise BusError(subject, "malformed reply") from None


class Responder:
    """Answers requests, only on inboxes of the users allowed to ask, with no headers.

    `reply_user(msg)` is the first thing a handler calls: None means the request is
    dropped (unanswered) and the handler audits it. Replies never carry the request's
    headers (`Msg.respond` copies them, which let a requester smuggle e.g. `Nats-Rollup`
    onto whatever it named as reply subject).
    """

    def __init__(self, nc: NATS, allowed_users: Iterable[str]) -> None:
        self._nc = nc
        self._allowed = frozenset(allowed_users)

    def reply_user(self, msg: Msg) -> str | None:
        owner = inbox_owner(msg.reply)
        return owner if owner in self._allowed else None

    async def reply(self, msg: Msg, reply: BaseModel) -> None:
        if self.reply_user(msg) is None:  # callers check first; this is the backstop
            return
        await self._nc.publish(msg.reply, reply.model_dump_json().encode())

    async def error(self, msg: Msg, code: str, message: str) -> None:
        await self.reply(msg, ErrorReply(error=ErrorBody(code=code, message=message)))


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
