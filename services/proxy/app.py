"""The proxy's HTTP edge: wiring, lifespan, CORS, and the allowlisted proxy paths.

The proxy paths bypass FastAPI's router and go straight to `ProxyHandler` (an ASGI
callable): routing, dependency injection and pydantic would cost more than every
check the proxy makes. Health, readiness and metrics are ordinary FastAPI routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from shared import bus
from shared.budgets import ADMISSION_RIDER, Budgets
from shared.errors import ApiError
from shared.events import EventPublisher, drift_reporter
from shared.httpedge import add_edge_routes, parse_networks, service_app
from shared.leases import LeaseClient
from shared.metering import SpendMeter
from shared.policy import PolicyHolder
from shared.pricing import DEFAULT_PRICES_FILE, load_prices
from shared.ratelimit import Admission, redis_client
from shared.streams import EDGE_STREAMS, StreamGuard
from shared.telemetry import redactor

from .access import TokenCache
from .apidocs import document_routes
from .cache import ResponseCache
from .handler import RATE_LAYERS, ProxyHandler
from .policy import RequestPolicy
from .routes import PREFIX
from .settings import Settings
from .upstream import Forwarder, KeySource, OpenedLeaseCache
from .voice import open_voice

__all__ = ["CORS_ALLOWED_HEADERS", "CORS_EXPOSED_HEADERS", "create_app"]

log = logging.getLogger(__name__)

CORS_ALLOWED_HEADERS = [
    "Authorization",
    "Content-Type",
    "Content-Digest",
    "Signature",
    "Signature-Input",
    "X-Keyveil-Cache",
]
CORS_EXPOSED_HEADERS = [
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "X-Keyveil-Cache",
    "Location",  # a brokered Realtime call's proxy URL
    "X-Keyveil-Call-Id",
]
_NOT_READY = orjson.dumps(
    {"error": {"code": "not_ready", "message": "the proxy is starting or stopping"}}
)
_INTERNAL = orjson.dumps({"error": {"code": "internal_error", "message": "internal error"}})


@dataclass
class _Live:
    handler: ProxyHandler | None = None


class _ProxyPaths:
    """Sends the proxy prefix to the handler and everything else to FastAPI.

    It is the outermost middleware, so proxy requests skip the FastAPI/Starlette stack;
    it answers CORS for them itself (preflights through Starlette's CORSMiddleware,
    the grant on actual responses inline), with exactly the same policy.
    """

    def __init__(self, app: ASGIApp, live: _Live, settings: Settings) -> None:
        self.app = app
        self.live = live
        self._origins = frozenset(origin.encode() for origin in settings.allowed_origins)
        self._expose = ", ".join(CORS_EXPOSED_HEADERS).encode()
        self._preflight = CORSMiddleware(
            self._proxy,
            allow_origins=settings.allowed_origins,
            allow_methods=["POST"],
            allow_headers=CORS_ALLOWED_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            allow_credentials=False,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
        elif scope["method"] == "OPTIONS":
            await self._preflight(scope, receive, send)
        else:
            await self._proxy(scope, receive, send)

    def _cors(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        for name, value in scope["headers"]:
            if name == b"origin" or name.lower() == b"origin":
                if value in self._origins:
                    return [
                        (b"access-control-allow-origin", value),
                        (b"access-control-expose-headers", self._expose),
                        (b"vary", b"Origin"),
                    ]
                return []
        return []

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        cors = self._cors(scope)
        handler = self.live.handler
        if handler is None:
            await _send_json(send, 503, _NOT_READY, cors)
            return
        try:
            await handler(scope, receive, send, cors)
        except ApiError:
            raise
        except Exception as exc:  # never a traceback or a 500 page to the client
            log.error("unhandled %s in the proxy path", type(exc).__name__, exc_info=exc)
            with contextlib.suppress(Exception):
                await _send_json(send, 500, _INTERNAL, cors)


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, *, keys: KeySource | None = None) -> FastAPI:
    """The proxy app. `keys` replaces the key-manager lease client (benchmarks only)."""
    redactor.register(*settings.secret_values())
    policy = PolicyHolder(settings.policy_file, service="proxy")  # ConfigError: refuse to start
    prices = load_prices(settings.prices_file or DEFAULT_PRICES_FILE)  # likewise
    live = _Live()
    state: dict[str, Any] = {"nats": False, "streams": None}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            redis = redis_client(settings.redis_url, settings.redis_timeout_s)
            stack.push_async_callback(redis.aclose)
            cache_redis = redis_client(settings.response_cache_redis_url, settings.redis_timeout_s)
            stack.push_async_callback(cache_redis.aclose)

            def on_state(connected: bool) -> None:
                state["nats"] = connected

            nc: NATS = await bus.connect(settings, name="proxy", on_state=on_state)
            stack.push_async_callback(nc.drain)
            js = nc.jetstream()
            outbox = settings.outbox_dir / "proxy" if settings.outbox_dir else None
            publisher = EventPublisher(js, outbox_dir=outbox)
            publisher.start()
            stack.push_async_callback(publisher.close)
            guard = StreamGuard(
                js,
                EDGE_STREAMS,
                replicas=settings.jetstream_replicas,
                on_drift=drift_reporter(publisher, "proxy"),
            )
            guard.start()
            stack.push_async_callback(guard.stop)
            state["streams"] = guard
            key_source = keys
            if key_source is None:
                leases = LeaseClient(
                    nc,
                    requester="proxy",
                    environment=settings.lease_environment,
                    timeout_s=settings.nats_request_timeout_s,
                )
                await leases.start()
                stack.push_async_callback(leases.stop)
                key_source = OpenedLeaseCache(leases)
            forwarder: Forwarder | None = None
            if not settings.demo_mode:
                forwarder = Forwarder(
                    base_url=settings.openai_base_url,
                    keys=key_source,
                    transport=settings.upstream_transport,
                    connect_timeout_s=settings.upstream_connect_timeout_s,
                    read_timeout_s=settings.upstream_read_timeout_s,
                    max_connections=settings.upstream_max_connections,
                )
                stack.push_async_callback(forwarder.aclose)
            keyring = settings.keyring()
            budgets = None
            if settings.budgets:
                budgets = Budgets(
                    redis,
                    hold_ttl_s=settings.budget_hold_ttl_s,
                    failure_mode=settings.budget_failure_mode,
                    pipelined=True,
                )
                stack.push_async_callback(budgets.aclose)
            voice = None
            if not settings.demo_mode:
                voice = await open_voice(
                    stack,
                    settings=settings,
                    redis=redis,
                    keys=key_source,
                    publisher=publisher,
                    spend=SpendMeter(prices),
                    budgets=budgets,
                    policy=policy.current.voice,
                )
            # One pipelined connection for the per-request admission script.
            # With budgets, a second script carries the reservation (one round trip).
            admission = Admission(
                redis,
                service="proxy",
                pipelined=True,
                rider=ADMISSION_RIDER if budgets is not None else None,
                failure_modes=dict.fromkeys(RATE_LAYERS, settings.rate_limit_failure_mode),
                block_after_strikes=settings.block_after_strikes,
                strike_window_s=settings.strike_window_s,
                block_for_s=settings.block_for_s,
            )
            stack.push_async_callback(admission.aclose)
            handler = ProxyHandler(
                settings=settings,
                tokens=TokenCache(keyring, settings.token_cache_size),
                admission=admission,
                forwarder=forwarder,
                cache=ResponseCache(
                    cache_redis,
                    ttl_s=settings.cache_ttl_s,
                    max_entry_bytes=settings.cache_max_entry_bytes,
                )
                if settings.cache_max_entry_bytes
                else None,
                publisher=publisher,
                trusted_proxies=parse_networks(settings.trusted_proxies),
                voice=voice,
                policy=RequestPolicy(policy),
                prices=prices,
                budgets=budgets,
            )
            policy.start()
            stack.push_async_callback(policy.stop)
            stack.push_async_callback(handler.drain)
            app.state.redis = redis
            app.state.nats = nc
            if forwarder is not None:
                # Warm the lease cache so the first request does not pay for it.
                warm = asyncio.create_task(_warm(key_source))
                stack.callback(warm.cancel)
            live.handler = handler
            try:
                yield
            finally:
                live.handler = None
                if voice is not None:
                    # First, before any other clean-up: another replica takes over now.
                    await voice.let_go()

    app = service_app("keyveil proxy", lifespan)

    async def nats_ready() -> bool:
        return bool(state["nats"])

    async def redis_ready() -> bool:
        return bool(await app.state.redis.ping())

    async def streams_ready() -> bool:
        guard: StreamGuard | None = state["streams"]
        return guard is not None and await guard.ready()

    add_edge_routes(app, {"nats": nats_ready, "redis": redis_ready, "streams": streams_ready})
    document_routes(app)  # the spec only: _ProxyPaths answers these paths first
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_methods=["POST"],
        allow_headers=CORS_ALLOWED_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        allow_credentials=False,
        max_age=600,
    )
    # Added last, so it runs first: proxy requests never enter the FastAPI stack.
    app.add_middleware(_ProxyPaths, live=live, settings=settings)
    return app


async def _warm(keys: KeySource) -> None:
    try:
        await keys.authorization()
    except ApiError as exc:
        log.warning("key lease not available yet (%s)", exc.code)
