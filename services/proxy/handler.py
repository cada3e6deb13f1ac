"""The proxy hot path, as a plain ASGI callable for the allowlisted paths.

Order of checks (cheapest and most decisive first): allowlisted path and method,
token (cached verification, expiry every time), scope, origin, signature (CPU only),
then one Redis round trip for IP block + revocation + nonce + rate limits, then the
body (size cap, digest, shape), then the provider. Any refusal is a JSON error with
a stable code, and nothing reaches the provider.

With budgets on (KEYVEIL_BUDGETS), a budgeted call (chat, Responses, speech,
transcription) reads its body first, then makes that same round trip with the budget
reservation inside it (`shared.budgets.ADMISSION_RIDER`): the estimate needs the body.
Reading before the Redis checks is acceptable because the read is bounded (size cap,
idle and total deadlines, the spool budget for uploads) and digest-checked against the
signature; what it costs is that a blocked, revoked or rate-limited caller can still
make the proxy read one bounded body, and that a bad body is refused before a revoked
token is. Other calls (voice sessions) keep the order above.

Answers are sent with raw ASGI messages: no Starlette Response objects, no task group
per response. A small fixed-length provider answer (the usual JSON completion) is read
whole (at most `_INLINE_MAX` bytes) and sent with a Content-Length; everything else
(SSE, audio, large or chunked bodies) is relayed chunk by chunk as it arrives, with
one watcher task per stream that closes the provider connection as soon as the client
goes away (which includes a client the edge protocol cut for not reading its answer).

Bounds against hostile clients here: request bodies are read with an idle timeout and
a deadline (408), uploads in flight share the process's spool budget (503, before the
body is read), and refusals made before any token was verified are counted in metrics
but their usage events are sampled (`shared.refusals`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

import orjson
from prometheus_client import Counter, Histogram
from starlette.types import Message, Receive, Scope, Send

from shared.budgets import Budgets, Estimate, Hold
from shared.contract import Refusal, counts_as_strike, refusal_category
from shared.errors import (
    ApiError,
    UpstreamError,
    UpstreamTimeoutError,
    error_body,
)
from shared.events import EventPublisher, UsageEvent
from shared.eventschema import CLIENT_GONE, SERVED_BY_DEMO, SERVED_FROM_CACHE, Reason, Refused
from shared.guard import SignedRequest, SignedRequestGuard
from shared.httpedge import (
    IpNetwork,
    client_ip,
    country_code,
    from_trusted_proxy,
    signed_scheme,
)
from shared.metering import SpendMeter, event_fields
from shared.pricing import DEFAULT_PRICES_FILE, PriceTable, Usage, load_prices
from shared.ratelimit import Admission, Limit
from shared.refusals import RefusalSampler
from shared.signing import ExpectedDigest
from shared.telemetry import redactor

from .access import Caller, TokenCache, authenticate
from .bodies import ClientGoneError, SpoolBudget, read_chunks, read_json, spool_multipart
from .cache import OPT_IN_HEADER, ResponseCache
from .demo import DemoAnswer, demo_response
from .metrics import (
    ADDED_LATENCY,
    AUTH_FAILURES,
    CANCELLED,
    REJECTIONS,
    REQUEST_DURATION,
    REQUESTS,
    UPSTREAM_LATENCY,
    status_class,
)
from .policy import USER_LAYER, RequestPolicy
from .routes import ROUTES, BodyKind, Route
from .settings import Settings
from .spend import SpendGuard
from .upstream import Forwarder, UpstreamResponse, UpstreamStreamError, combine_headers
from .usage import UsageTap, ask_for_usage
from .voice.broker import VoiceBroker

__all__ = ["RATE_LAYERS", "ProxyHandler"]

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# The rate-limit layers of a proxy call (PROXY_RATE_LIMIT_FAILURE_MODE applies to each).
RATE_LAYERS = ("per-token", "per-ip", USER_LAYER)
_MAX_ERROR_BODY = 64 * 1024
# Provider answers up to this size, with a Content-Length, are read whole and sent in
# one piece; anything larger or open-ended streams through.
_INLINE_MAX = 64 * 1024
_OTHER = Route("other", None, "", BodyKind.json)  # type: ignore[arg-type]
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS: Headers = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_CLIENT_GONE = 499
# Refusals decided before any token was verified: their usage events are sampled.
_UNVERIFIED = frozenset(
    {"not_found", "method_not_allowed", "token_missing", "token_invalid", "token_expired"}
)


class _MethodNotAllowedError(ApiError):
    status = 405
    default_code = "method_not_allowed"


@dataclass
class _Exchange:
    """What one request has learned so far, for metrics and its usage event."""

    route: Route
    ip: str
    started: float
    caller: Caller | None = None
    model: str | None = None
    key_id: str | None = None  # the leased provider key that served the call
    country: str | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    characters: int = 0  # what plain speech audio is billed by (the request's input)
    hold: Hold | None = None  # a budget reservation, settled in _finish


@dataclass
class _Relay:
    """A provider answer still to be streamed to the client."""

    upstream: UpstreamResponse
    started: float
    content_type: str
    sse: bool
    cache_key: str | None


@dataclass
class _Reply:
    """What goes back to the client: a whole body, a stream of events, or a relay."""

    status: int
    headers: Headers
    body: bytes = b""
    events: AsyncIterator[bytes] | None = None
    relay: _Relay | None = None
    exchange: _Exchange | None = None


def _encode(headers: dict[str, str]) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-cased request headers, repeated fields combined as RFC 9110 says.

    Repeats are collected and joined once: joining per repeat is quadratic.
    """
    return combine_headers(scope["headers"])


class _Meters:
    """Label children bound once, not looked up on every request."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], Counter] = {}
        self._histograms: dict[str, tuple[Histogram, Histogram, Histogram]] = {}

    def requests(self, endpoint: str, status: int) -> Counter:
        key = (endpoint, status // 100)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = REQUESTS.labels(endpoint, status_class(status))
        return child

    def histograms(self, endpoint: str) -> tuple[Histogram, Histogram, Histogram]:
        found = self._histograms.get(endpoint)
        if found is None:
            found = self._histograms[endpoint] = (
                REQUEST_DURATION.labels(endpoint),
                ADDED_LATENCY.labels(endpoint),
                UPSTREAM_LATENCY.labels(endpoint),
            )
        return found


class ProxyHandler:
    def __init__(
        self,
        *,
        settings: Settings,
        tokens: TokenCache,
        admission: Admission,
        forwarder: Forwarder | None,
        cache: ResponseCache | None,
        publisher: EventPublisher | None,
        trusted_proxies: list[IpNetwork],
        voice: VoiceBroker | None = None,
        policy: RequestPolicy | None = None,
        prices: PriceTable | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self._settings = settings
        self._voice = voice
        self._policy = policy or RequestPolicy.built_in()
        self._spend = SpendMeter(prices or load_prices(DEFAULT_PRICES_FILE))
        self._spend_guard = SpendGuard(budgets, self._spend.prices) if budgets is not None else None
        self._tokens = tokens
        self._admission = admission
        self._forwarder = forwarder
        self._cache = cache
        self._publisher = publisher
        self._trusted = trusted_proxies
        self._origins = frozenset(settings.allowed_origins)
        self._country_header = (settings.country_header or "").lower() or None
        self._guard = SignedRequestGuard(
            tokens=tokens,
            admission=admission,
            window_s=settings.signature_window_s,
            require_digest=True,  # the body is streamed and checked against the digest
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._meters = _Meters()
        self._spool = SpoolBudget(settings.spool_budget_bytes)
        self._event_template = UsageEvent(service="proxy", type="proxy.request", mode="proxy")
        self._refusals = (
            RefusalSampler(publisher.emit, interval_s=settings.refusal_event_interval_s)
            if publisher is not None
            else None
        )

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, extra_headers: Headers | None = None
    ) -> None:
        """Answer one proxy request; `extra_headers` (CORS) go on every answer."""
        reply = await self.handle(scope, receive)
        headers = reply.headers
        if extra_headers:
            headers.extend(extra_headers)
        if reply.relay is not None:
            assert reply.exchange is not None
            await self._stream_relay(reply, reply.relay, reply.exchange, receive, send)
            return
        if reply.events is not None:
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            async for chunk in reply.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    # -- the request -------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive) -> _Reply:
        started = perf_counter()
        route = ROUTES.get(scope["path"])
        client = scope.get("client")
        headers = _headers(scope)
        ip = client_ip(client[0] if client else None, headers.get("x-forwarded-for"), self._trusted)
        exchange = _Exchange(route or _OTHER, ip, started)
        if self._country_header is not None:
            peer = client[0] if client else None
            exchange.country = country_code(
                from_trusted_proxy(peer, headers.get(self._country_header), self._trusted)
            )
        try:
            if route is None:
                raise Refusal.NOT_FOUND.error("no such proxy endpoint")
            if scope["method"] != "POST":
                raise _MethodNotAllowedError(
                    "only POST is allowed", code="method_not_allowed", headers={"Allow": "POST"}
                )
            return await self._admitted(scope, receive, route, headers, exchange)
        except ApiError as exc:
            return self._refused(exchange, exc, before_upstream=True)
        except ClientGoneError:
            self._finish(exchange, _CLIENT_GONE, upstream_s=0.0, reason=CLIENT_GONE)
            return _Reply(_CLIENT_GONE, [])

    async def _admitted(
        self,
        scope: Scope,
        receive: Receive,
        route: Route,
        headers: dict[str, str],
        exchange: _Exchange,
    ) -> _Reply:
        now = time.time()
        caller = authenticate(
            route=route,
            guard=self._guard,
            request=SignedRequest(
                method="POST",
                path=scope.get("raw_path", b"").decode("latin-1") or scope["path"],
                query=scope.get("query_string", b"").decode("latin-1"),
                authority=headers.get("host", ""),
                scheme=self._scheme(scope, headers),
                headers=headers,
            ),
            allowed_origins=self._origins,
            now=now,
        )
        exchange.caller = caller
        jti = caller.claims.jti
        limits = [
            Limit("per-token", jti, self._settings.rate_limit_per_min, 60.0),
            Limit("per-ip", exchange.ip, self._settings.ip_rate_limit_per_min, 60.0),
            *self._policy.user_limits(caller.claims, self._settings.user_rate_limit_per_min),
        ]
        spend = self._spend_guard
        if spend is not None and not spend.covers(route):
            spend = None
        if spend is None:
            decision = await self._guard.admit(caller, client_ip=exchange.ip, limits=limits)
            exchange.rate_headers = decision.headers()
        digest = caller.signature.digest
        assert digest is not None  # verify_request(require_digest=True) guarantees it
        if route.body is BodyKind.voice:
            return await self._voice_session(exchange, route, headers, receive, digest)
        if route.body is BodyKind.multipart:
            reserved = self._spool.reserve(
                content_length=headers.get("content-length"),
                limit=self._settings.max_upload_bytes,
            )
            try:
                upload = await spool_multipart(
                    self._body(receive),
                    content_type=headers.get("content-type"),
                    content_length=headers.get("content-length"),
                    digest=digest,
                    limit=self._settings.max_upload_bytes,
                    spool_dir=self._settings.spool_dir,
                )
                try:
                    exchange.model = upload.model
                    self._policy.check_upload(route, caller.claims, upload)
                    if spend is not None:
                        await self._admit_budgeted(
                            exchange, caller, limits, spend, spend.upload_estimate(upload)
                        )
                    if self._settings.demo_mode:
                        return self._demo(exchange, stream=False)
                    return await self._forward(
                        exchange, headers, upload.stream(), content_length=upload.size
                    )
                finally:
                    upload.close()
            finally:
                self._spool.release(reserved)
        body = await read_json(
            self._body(receive),
            content_type=headers.get("content-type"),
            content_length=headers.get("content-length"),
            digest=digest,
            limit=self._settings.max_json_body_bytes,
        )
        exchange.model = body.model
        body = ask_for_usage(route, self._policy.apply(route, caller.claims, body))
        if route.endpoint == "audio_speech" and isinstance(text := body.payload.get("input"), str):
            exchange.characters = len(text)
        if spend is not None:
            cap = self._policy.output_cap(route, caller.claims)
            estimate = spend.estimate(route, body, cap)
            await self._admit_budgeted(exchange, caller, limits, spend, estimate)
        if self._settings.demo_mode:
            return self._demo(exchange, stream=bool(body.payload.get("stream")))
        cache_key: str | None = None
        if route.cacheable and self._cache is not None and headers.get(OPT_IN_HEADER) == "1":
            cache_key = self._cache.key(sid=caller.claims.sid, route=route, payload=body.payload)
            hit = await self._cache.get(cache_key)
            if hit is not None:
                content_type, cached = hit
                self._finish(exchange, 200, upstream_s=0.0, reason=SERVED_FROM_CACHE)
                out = {**exchange.rate_headers, "content-type": content_type}
                out["x-keyveil-cache"] = "hit"
                return _Reply(200, _encode(out), cached)
        return await self._forward(exchange, headers, body.raw, cache_key=cache_key)

    async def _admit_budgeted(
        self,
        exchange: _Exchange,
        caller: Caller,
        limits: list[Limit],
        spend: SpendGuard,
        estimate: Estimate,
    ) -> None:
        """The admission and the budget reservation in one Redis round trip (one script):
        a call refused by a budget consumes no rate limit and no nonce (a later retry of
        the same signed request may pass once), one refused by a check holds nothing."""
        claim = spend.claim(caller.claims, estimate)
        decision = await self._guard.admit(
            caller, client_ip=exchange.ip, limits=limits, rider=claim.rider
        )
        exchange.rate_headers = decision.headers()
        exchange.hold = spend.held(claim, decision)

    def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        return read_chunks(
            receive,
            idle_s=self._settings.body_read_timeout_s,
            total_s=self._settings.body_total_timeout_s,
        )

    async def _voice_session(
        self,
        exchange: _Exchange,
        route: Route,
        headers: dict[str, str],
        receive: Receive,
        digest: ExpectedDigest,
    ) -> _Reply:
        """A brokered voice session (services.proxy.voice), admitted like any call."""
        if self._voice is None:
            raise Refusal.VOICE_UNAVAILABLE.error("voice sessions are off in demo mode")
        assert exchange.caller is not None
        try:
            answer = await self._voice.open(
                route=route,
                claims=exchange.caller.claims,
                headers=headers,
                body=self._body(receive),
                digest=digest,
            )
        except (UpstreamError, UpstreamTimeoutError) as exc:
            return self._refused(exchange, exc, before_upstream=False)
        exchange.model = answer.model
        self._finish(exchange, answer.status, answer.upstream_s)
        return _Reply(
            answer.status, _encode({**exchange.rate_headers, **answer.headers}), answer.body
        )

    def _scheme(self, scope: Scope, headers: dict[str, str]) -> str:
        peer = (scope.get("client") or (None,))[0]
        scheme = str(scope.get("scheme", "http"))
        return signed_scheme(scheme, peer, headers.get("x-forwarded-proto"), self._trusted)

    # -- answers -----------------------------------------------------------------------

    def _demo(self, exchange: _Exchange, *, stream: bool) -> _Reply:
        answer: DemoAnswer = demo_response(exchange.route, model=exchange.model, stream=stream)
        headers = _encode({**exchange.rate_headers, "content-type": answer.content_type})
        self._finish(exchange, 200, upstream_s=0.0, reason=SERVED_BY_DEMO)
        return _Reply(200, headers, answer.body, events=answer.events)

    async def _forward(
        self,
        exchange: _Exchange,
        headers: dict[str, str],
        content: bytes | AsyncIterator[bytes],
        *,
        content_length: int | None = None,
        cache_key: str | None = None,
    ) -> _Reply:
        assert self._forwarder is not None
        upstream_started = perf_counter()
        try:
            upstream = await self._forwarder.send(
                exchange.route,
                client_headers=headers,
                content=content,
                content_length=content_length,
            )
        except ApiError as exc:
            return self._refused(exchange, exc, before_upstream=False)
        exchange.key_id = upstream.lease.key_id
        status = upstream.status
        if status >= 500 or status in (401, 403):
            upstream.abort()
            # The provider refusing our key is our fault, not the client's: never relay it.
            refusal = Refusal.UPSTREAM_ERROR if status >= 500 else Refusal.UPSTREAM_AUTH_FAILED
            error = refusal.error(f"the provider answered {status}")
            return self._refused(exchange, error, before_upstream=False)
        if status >= 400:
            return await self._relay_error(exchange, upstream, upstream_started)
        content_type = upstream.headers.get("content-type", "application/octet-stream")
        sse = content_type.startswith("text/event-stream")
        out = {**upstream.passthrough_headers(), **exchange.rate_headers}
        out["content-type"] = content_type
        length = upstream.content_length
        if sse or length is None or length > _INLINE_MAX:
            relay = _Relay(upstream, upstream_started, content_type, sse, cache_key)
            reply_headers = _encode(out)
            if sse:
                reply_headers.extend(_SSE_HEADERS)
            return _Reply(status, reply_headers, relay=relay, exchange=exchange)
        # The usual JSON answer: small and of known length, read whole and sent at once.
        try:
            body = await upstream.read_exactly(length)
        except UpstreamStreamError as exc:
            upstream.abort()
            log.warning("upstream answer broke off (%s)", exc)
            error = Refusal.UPSTREAM_ERROR.error("the provider's answer broke off")
            return self._refused(exchange, error, before_upstream=False)
        upstream.release()
        tap = self._tap(exchange, sse=False, content_type=content_type)
        tap.feed(body)
        self._finish(exchange, status, perf_counter() - upstream_started, usage=tap.result())
        if cache_key is not None and self._cache is not None:
            self._spawn(self._cache.put(cache_key, content_type, body))
        return _Reply(status, _encode(out), body)

    async def _relay_error(
        self, exchange: _Exchange, upstream: UpstreamResponse, upstream_started: float
    ) -> _Reply:
        """The provider's 4xx body, passed through (bounded, and scrubbed to be sure)."""
        try:
            raw = await upstream.read_capped(_MAX_ERROR_BODY)
        except UpstreamStreamError:
            raw = b""
        finally:
            upstream.abort()
        body = redactor.redact(raw.decode("utf-8", "replace")).encode()
        out = {**upstream.passthrough_headers(), **exchange.rate_headers}
        self._finish(exchange, upstream.status, perf_counter() - upstream_started)
        return _Reply(upstream.status, _encode(out), body)

    async def _stream_relay(
        self, reply: _Reply, relay: _Relay, exchange: _Exchange, receive: Receive, send: Send
    ) -> None:
        upstream = relay.upstream
        tap = self._tap(exchange, sse=relay.sse, content_type=relay.content_type)
        cache = self._cache if relay.cache_key is not None else None
        kept: list[bytes] | None = [] if cache is not None else None
        kept_size = 0
        state = {"done": False, "gone": False}

        async def watch() -> None:
            # After the body was read, receive() returns only when the client leaves
            # (or the response is complete).
            message: Message = await receive()
            while message["type"] != "http.disconnect":
                message = await receive()
            if not state["done"]:
                state["gone"] = True
                upstream.abort()  # cancels the provider call now, not at the next chunk

        watcher = asyncio.get_running_loop().create_task(watch())
        status = upstream.status
        complete = False
        try:
            await send({"type": "http.response.start", "status": status, "headers": reply.headers})
            while chunk := await upstream.readany():
                tap.feed(chunk)
                if kept is not None and cache is not None:
                    kept_size += len(chunk)
                    if kept_size > cache.max_entry_bytes:
                        kept = None
                    else:
                        kept.append(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if state["gone"]:
                    break
            complete = not state["gone"]
        except UpstreamStreamError as exc:
            # Headers are already sent: the client sees a truncated body.
            if not state["gone"]:
                status = 502
                log.warning("upstream stream broke (%s)", exc)
        except BaseException:
            state["gone"] = True  # cancelled (shutdown): treat as the client going away
            raise
        finally:
            state["done"] = True
            watcher.cancel()
            if complete:
                upstream.release()
            else:
                upstream.abort()
                kept = None
            if state["gone"]:
                status = _CLIENT_GONE
                CANCELLED.inc()
            self._finish(exchange, status, perf_counter() - relay.started, usage=tap.result())
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if cache is not None and kept is not None and relay.cache_key is not None and status < 300:
            self._spawn(cache.put(relay.cache_key, relay.content_type, b"".join(kept)))

    @staticmethod
    def _tap(exchange: _Exchange, *, sse: bool, content_type: str) -> UsageTap:
        return UsageTap(
            sse=sse,
            json_body=content_type.startswith("application/json"),
            audio_output=exchange.route.endpoint == "audio_speech",
            characters=exchange.characters,
        )

    def _refused(self, exchange: _Exchange, exc: ApiError, *, before_upstream: bool) -> _Reply:
        if before_upstream:
            category = refusal_category(exc)
            REJECTIONS.labels(category).inc()
            if counts_as_strike(exc):
                AUTH_FAILURES.labels("proxy", category).inc()
                self._spawn(self._admission.strike(exchange.ip, category))
        # Nobody was authenticated yet: counted always, but its usage event is sampled.
        sampled = before_upstream and exchange.caller is None and exc.code in _UNVERIFIED
        self._finish(
            exchange,
            exc.status,
            upstream_s=0.0,
            reason=Refused.of(exc),
            refused=before_upstream,
            sampled=sampled,
        )
        headers = _encode({**exchange.rate_headers, **exc.headers})
        headers.append(_JSON)
        body = orjson.dumps(error_body(exc.code, exc.message))
        return _Reply(exc.status, headers, body)

    # -- bookkeeping ---------------------------------------------------------------------

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _finish(
        self,
        exchange: _Exchange,
        status: int,
        upstream_s: float,
        *,
        reason: Reason | None = None,
        refused: bool = False,
        sampled: bool = False,
        usage: Usage | None = None,
    ) -> None:
        total = perf_counter() - exchange.started
        endpoint = exchange.route.endpoint
        self._meters.requests(endpoint, status).inc()
        duration, added, upstream = self._meters.histograms(endpoint)
        duration.observe(total)
        added.observe(max(total - upstream_s, 0.0))
        if upstream_s:
            upstream.observe(upstream_s)
        claims = exchange.caller.claims if exchange.caller else None
        priced = (
            self._spend.record(
                model=exchange.model, app=claims.app if claims else None, usage=usage
            )
            if usage is not None
            else None
        )
        if exchange.hold is not None and self._spend_guard is not None:
            relayed = reason is None and not refused
            self._spend_guard.settle(exchange.hold, status, priced, relayed=relayed)
            exchange.hold = None
        if self._publisher is None:
            return
        outcome: Literal["ok", "denied", "error"] = (
            "denied" if refused else ("error" if status >= 500 else "ok")
        )
        # A copy of a validated template with fresh values: a quarter of the cost of
        # building the model (every value here comes from checked data).
        emit = self._refusals.refused if sampled and self._refusals else self._publisher.emit
        emit(
            self._event_template.model_copy(
                update={
                    "event_id": uuid.uuid4().hex,
                    "ts": time.time(),
                    "outcome": outcome,
                    "reason": reason,
                    "status": status,
                    "client_ip": exchange.ip,
                    "token_id": claims.jti if claims else None,
                    "session_id": claims.sid if claims else None,
                    "path": exchange.route.upstream_suffix or None,
                    "model": exchange.model,
                    "key_id": exchange.key_id,
                    "country": exchange.country,
                    "user": claims.sub if claims else None,
                    "app": claims.app if claims else None,
                    "latency_ms": round(total * 1000, 3),
                    "upstream_latency_ms": round(upstream_s * 1000, 3) if upstream_s else None,
                    **(event_fields(priced) if priced is not None else {}),
                }
            )
        )

    async def drain(self) -> None:
        """Let background work (strikes, cache writes) finish at shutdown."""
        if self._refusals is not None:
            self._refusals.close()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
