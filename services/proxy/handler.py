"""The proxy hot path, as a plain ASGI callable for the allowlisted paths.

Order of checks (cheapest and most decisive first): allowlisted path and method,
token (cached verification, expiry every time), scope, origin, signature (CPU only),
then one Redis round trip for IP block + revocation + nonce + rate limits, then the
body (size cap, digest, shape), then the provider. Any refusal is a JSON error with
a stable code, and nothing reaches the provider.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

import anyio
import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.errors import (
    ApiError,
    AuthError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
    UpstreamError,
)
from shared.events import EventPublisher, UsageEvent
from shared.httpedge import IpNetwork, client_ip
from shared.ratelimit import Admission, Decision, Limit
from shared.telemetry import redactor

from .access import Caller, TokenCache, authenticate, rejection_reason
from .bodies import JsonBody, Upload, read_json, spool_multipart
from .cache import OPT_IN_HEADER, ResponseCache
from .demo import demo_response
from .metrics import (
    ADDED_LATENCY,
    AUTH_FAILURES,
    REJECTIONS,
    REQUEST_DURATION,
    REQUESTS,
    UPSTREAM_LATENCY,
    status_class,
)
from .routes import ROUTES, BodyKind, Route
from .settings import Settings
from .upstream import Forwarder, passthrough_headers
from .usage import TokenUsage, UsageTap

__all__ = ["ProxyHandler"]

log = logging.getLogger(__name__)

_MAX_ERROR_BODY = 64 * 1024
_OTHER = Route("other", None, "", BodyKind.json)  # type: ignore[arg-type]


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
    rate_headers: dict[str, str] = field(default_factory=dict)


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-cased request headers, repeated fields combined as RFC 9110 says."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _refusal(decision: Decision) -> ApiError:
    headers = decision.headers()
    if decision.reason == "rate_limited":
        return RateLimitedError("rate limit exceeded", code="rate_limited", headers=headers)
    if decision.reason == "replay":
        return AuthError("this request was already seen", code="replay_detected")
    if decision.reason == "revoked":
        return AuthError("the proxy token was revoked", code="token_revoked")
    if decision.reason == "blocked":
        return ForbiddenError("this client is blocked", code="ip_blocked", headers=headers)
    return UnavailableError(
        "security checks are unavailable; try again", code="security_unavailable", headers=headers
    )


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
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._admission = admission
        self._forwarder = forwarder
        self._cache = cache
        self._publisher = publisher
        self._trusted = trusted_proxies
        self._origins = frozenset(settings.allowed_origins)
        self._window = settings.signature_window_s
        # A nonce must outlive every moment its `created` is still acceptable.
        self._nonce_ttl_s = math.ceil(2 * settings.signature_window_s) + 1
        self._background: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handle(scope, receive)
        try:
            await response(scope, receive, send)
        finally:
            if isinstance(response, StreamingResponse):
                iterator = response.body_iterator
                if isinstance(iterator, AsyncIterator) and hasattr(iterator, "aclose"):
                    # The client went away mid-stream: close the upstream call now.
                    with anyio.CancelScope(shield=True):
                        await iterator.aclose()

    # -- the request -------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        started = perf_counter()
        route = ROUTES.get(scope["path"])
        client = scope.get("client")
        headers = _headers(scope)
        ip = client_ip(client[0] if client else None, headers.get("x-forwarded-for"), self._trusted)
        exchange = _Exchange(route or _OTHER, ip, started)
        try:
            if route is None:
                raise NotFoundError("no such proxy endpoint", code="not_found")
            if scope["method"] != "POST":
                raise _MethodNotAllowedError(
                    "only POST is allowed", code="method_not_allowed", headers={"Allow": "POST"}
                )
            return await self._admitted(scope, receive, route, headers, exchange)
        except ApiError as exc:
            return self._refused(exchange, exc, before_upstream=True)

    async def _admitted(
        self,
        scope: Scope,
        receive: Receive,
        route: Route,
        headers: dict[str, str],
        exchange: _Exchange,
    ) -> Response:
        now = time.time()
        caller = authenticate(
            route=route,
            tokens=self._tokens,
            headers=headers,
            method="POST",
            path=scope.get("raw_path", b"").decode("latin-1") or scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            authority=headers.get("host", ""),
            scheme=self._scheme(scope, headers, exchange.ip),
            allowed_origins=self._origins,
            now=now,
            window_s=self._window,
        )
        exchange.caller = caller
        jti = caller.claims.jti
        decision = await self._admission.check(
            limits=[
                Limit("per-token", jti, self._settings.rate_limit_per_min, 60.0),
                Limit("per-ip", exchange.ip, self._settings.ip_rate_limit_per_min, 60.0),
            ],
            client_ip=exchange.ip,
            nonce=f"{jti}:{caller.signature.nonce}",
            nonce_ttl_s=self._nonce_ttl_s,
            revoked_token_id=jti,
        )
        if not decision.allowed:
            raise _refusal(decision)
        exchange.rate_headers = decision.headers()
        digest = caller.signature.digest
        assert digest is not None  # verify_request(require_digest=True) guarantees it
        request = Request(scope, receive)
        if route.body is BodyKind.multipart:
            upload = await spool_multipart(
                request.stream(),
                content_type=headers.get("content-type"),
                content_length=headers.get("content-length"),
                digest=digest,
                limit=self._settings.max_upload_bytes,
            )
            exchange.model = upload.model
            if self._settings.demo_mode:
                upload.close()
                return self._demo(exchange, None)
            return await self._forward_upload(exchange, headers, upload)
        body = await read_json(
            request.stream(),
            content_type=headers.get("content-type"),
            content_length=headers.get("content-length"),
            digest=digest,
            limit=self._settings.max_json_body_bytes,
        )
        exchange.model = body.model
        if self._settings.demo_mode:
            return self._demo(exchange, body)
        cache_key: str | None = None
        if route.cacheable and self._cache is not None and headers.get(OPT_IN_HEADER) == "1":
            cache_key = self._cache.key(sid=caller.claims.sid, route=route, payload=body.payload)
            hit = await self._cache.get(cache_key)
            if hit is not None:
                content_type, cached = hit
                self._finish(exchange, 200, upstream_s=0.0, reason="cache_hit")
                return Response(
                    cached,
                    media_type=content_type,
                    headers={**exchange.rate_headers, "X-Keyveil-Cache": "hit"},
                )
        return await self._forward(exchange, headers, body.raw, cache_key=cache_key)

    def _scheme(self, scope: Scope, headers: dict[str, str], ip: str) -> str:
        # Behind a trusted TLS-terminating ingress the client signed the https URL.
        forwarded = headers.get("x-forwarded-proto")
        if forwarded and self._trusted and ip != (scope.get("client") or ("",))[0]:
            return forwarded.split(",")[0].strip().lower()
        return str(scope.get("scheme", "http"))

    # -- answers -----------------------------------------------------------------------

    def _demo(self, exchange: _Exchange, body: JsonBody | None) -> Response:
        stream = bool(body and body.payload.get("stream"))
        response = demo_response(exchange.route, model=exchange.model, stream=stream)
        response.headers.update(exchange.rate_headers)
        self._finish(exchange, response.status_code, upstream_s=0.0, reason="demo")
        return response

    async def _forward_upload(
        self, exchange: _Exchange, headers: dict[str, str], upload: Upload
    ) -> Response:
        try:
            return await self._forward(
                exchange, headers, upload.stream(), content_length=upload.size
            )
        finally:
            upload.close()

    async def _forward(
        self,
        exchange: _Exchange,
        headers: dict[str, str],
        content: bytes | AsyncIterator[bytes],
        *,
        content_length: int | None = None,
        cache_key: str | None = None,
    ) -> Response:
        assert self._forwarder is not None
        upstream_started = perf_counter()
        try:
            upstream, _lease = await self._forwarder.send(
                exchange.route,
                client_headers=headers,
                content=content,
                content_length=content_length,
            )
        except ApiError as exc:
            return self._refused(exchange, exc, before_upstream=False)
        status = upstream.status_code
        if status >= 500 or status in (401, 403):
            await upstream.aclose()
            # The provider refusing our key is our fault, not the client's: never relay it.
            code = "upstream_error" if status >= 500 else "upstream_auth_failed"
            error = UpstreamError(f"the provider answered {status}", code=code)
            return self._refused(exchange, error, before_upstream=False)
        if status >= 400:
            return await self._relay_error(exchange, upstream, upstream_started)
        return self._relay(exchange, upstream, upstream_started, cache_key)

    async def _relay_error(
        self, exchange: _Exchange, upstream: httpx.Response, upstream_started: float
    ) -> Response:
        """The provider's 4xx body, passed through (bounded, and scrubbed to be sure)."""
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in upstream.aiter_raw():
                size += len(chunk)
                if size > _MAX_ERROR_BODY:
                    break
                chunks.append(chunk)
        except httpx.HTTPError:
            pass
        finally:
            await upstream.aclose()
        body = redactor.redact(b"".join(chunks).decode("utf-8", "replace")).encode()
        out_headers = {**passthrough_headers(upstream), **exchange.rate_headers}
        self._finish(exchange, upstream.status_code, perf_counter() - upstream_started)
        return Response(body, status_code=upstream.status_code, headers=out_headers)

    def _relay(
        self,
        exchange: _Exchange,
        upstream: httpx.Response,
        upstream_started: float,
        cache_key: str | None,
    ) -> Response:
        content_type = upstream.headers.get("content-type", "application/octet-stream")
        sse = content_type.startswith("text/event-stream")
        tap = UsageTap(sse=sse, json_body=content_type.startswith("application/json"))
        cache = self._cache if cache_key is not None else None
        out_headers = {**passthrough_headers(upstream), **exchange.rate_headers}
        if sse:
            out_headers["cache-control"] = "no-cache"
            out_headers["x-accel-buffering"] = "no"  # nginx: flush each event

        async def relay() -> AsyncIterator[bytes]:
            status = upstream.status_code
            kept: list[bytes] | None = [] if cache is not None else None
            kept_size = 0
            try:
                async for chunk in upstream.aiter_raw():
                    tap.feed(chunk)
                    if kept is not None:
                        kept_size += len(chunk)
                        if cache is not None and kept_size > cache.max_entry_bytes:
                            kept = None
                        else:
                            kept.append(chunk)
                    yield chunk
            except httpx.HTTPError as exc:
                # Headers are already sent: the client sees a truncated body.
                status = 502
                log.warning("upstream stream broke (%s)", type(exc).__name__)
            except BaseException:
                status = 499  # the client went away; the upstream call is cancelled
                kept = None
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()
                self._finish(
                    exchange, status, perf_counter() - upstream_started, usage=tap.result()
                )
            if cache is not None and kept is not None and cache_key is not None and status < 300:
                self._spawn(cache.put(cache_key, content_type, b"".join(kept)))

        return StreamingResponse(relay(), status_code=upstream.status_code, headers=out_headers)

    def _refused(self, exchange: _Exchange, exc: ApiError, *, before_upstream: bool) -> Response:
        reason = rejection_reason(exc) if before_upstream else exc.code
        if before_upstream:
            REJECTIONS.labels(reason).inc()
            if exc.status in (401, 403) and exc.code != "ip_blocked":
                AUTH_FAILURES.labels("proxy", reason).inc()
                self._spawn(self._admission.strike(exchange.ip, reason))
        self._finish(exchange, exc.status, upstream_s=0.0, reason=reason, refused=before_upstream)
        headers = {**exchange.rate_headers, **exc.headers}
        return Response(
            orjson.dumps({"error": {"code": exc.code, "message": exc.message}}),
            status_code=exc.status,
            media_type="application/json",
            headers=headers,
        )

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
        reason: str | None = None,
        refused: bool = False,
        usage: TokenUsage | None = None,
    ) -> None:
        total = perf_counter() - exchange.started
        endpoint = exchange.route.endpoint
        REQUESTS.labels(endpoint, status_class(status)).inc()
        REQUEST_DURATION.labels(endpoint).observe(total)
        ADDED_LATENCY.labels(endpoint).observe(max(total - upstream_s, 0.0))
        if upstream_s:
            UPSTREAM_LATENCY.labels(endpoint).observe(upstream_s)
        if self._publisher is None:
            return
        claims = exchange.caller.claims if exchange.caller else None
        outcome: Literal["ok", "denied", "error"] = (
            "denied" if refused else ("error" if status >= 500 else "ok")
        )
        self._publisher.emit(
            UsageEvent(
                service="proxy",
                type="proxy.request",
                outcome=outcome,
                reason=reason,
                status=status,
                client_ip=exchange.ip,
                token_id=claims.jti if claims else None,
                session_id=claims.sid if claims else None,
                mode="proxy",
                path=exchange.route.upstream_suffix or None,
                model=exchange.model,
                latency_ms=round(total * 1000, 3),
                upstream_latency_ms=round(upstream_s * 1000, 3) if upstream_s else None,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                total_tokens=usage.total_tokens if usage else None,
            )
        )

    async def drain(self) -> None:
        """Let background work (strikes, cache writes) finish at shutdown."""
        if self._background:
            await asyncio.wait(self._background, timeout=5)
