"""The proxy's HTTP edge: wiring, lifespan, CORS, and the allowlisted proxy paths.

The proxy paths bypass FastAPI's router and go straight to `ProxyHandler` (an ASGI
callable): routing, dependency injection and pydantic would cost more than every
check the proxy makes. Health, readiness and metrics are ordinary FastAPI routes.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.budgets import ADMISSION_RIDER, BudgetAdmin, Budgets
from shared.errors import ApiError, error_body
from shared.httpedge import parse_networks
from shared.metering import SpendMeter
from shared.policy import PolicyHolder
from shared.pricing import DEFAULT_PRICES_FILE, load_prices
from shared.ratelimit import Admission
from shared.runtime import ServiceRuntime

from .access import TokenCache
from .apidocs import document_routes
from .burn import BurnReporter
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
_NOT_READY = orjson.dumps(error_body("not_ready", "the proxy is starting or stopping"))
_INTERNAL = orjson.dumps(error_body("internal_error", "internal error"))


def _cors_policy(settings: Settings) -> dict[str, Any]:
    """One CORS policy for the proxy paths (answered by `_ProxyPaths`) and the rest."""
    return {
        "allow_origins": settings.allowed_origins,
        "allow_methods": ["POST"],
        "allow_headers": CORS_ALLOWED_HEADERS,
        "expose_headers": CORS_EXPOSED_HEADERS,
        "allow_credentials": False,
        "max_age": 600,
    }


@dataclass
class _Live:
    handler: ProxyHandler | None = None

    def stop_accepting(self) -> None:
        self.handler = None


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
        self._preflight = CORSMiddleware(self._proxy, **_cors_policy(settings))

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
    policy = PolicyHolder(settings.policy_file, service="proxy")  # ConfigError: refuse to start
    prices = load_prices(settings.prices_file or DEFAULT_PRICES_FILE)  # likewise
    live = _Live()
    runtime = ServiceRuntime.for_edge(
        settings,
        service="proxy",
        leases=keys is None,
        outbox_dir=settings.outbox_dir / "proxy" if settings.outbox_dir else None,
    )

    async def build() -> None:
        key_source = keys if keys is not None else OpenedLeaseCache(runtime.leases)
        forwarder: Forwarder | None = None
        if not settings.demo_mode:
            forwarder = runtime.closing(
                Forwarder(
                    base_url=settings.openai_base_url,
                    keys=key_source,
                    transport=settings.upstream_transport,
                    connect_timeout_s=settings.upstream_connect_timeout_s,
                    read_timeout_s=settings.upstream_read_timeout_s,
                    max_connections=settings.upstream_max_connections,
                )
            )
        budgets = None
        if settings.budgets:
            budgets = runtime.closing(
                Budgets(
                    runtime.redis,
                    hold_ttl_s=settings.budget_hold_ttl_s,
                    failure_mode=settings.budget_failure_mode,
                    pipelined=True,
                )
            )
            if settings.budget_burn_interval_s:
                burn = BurnReporter(
                    BudgetAdmin(runtime.redis), interval_s=settings.budget_burn_interval_s
                )
                runtime.spawn(burn.run(), name="budget-burn", drain=False)
        voice = None
        if not settings.demo_mode:
            voice = await open_voice(
                runtime.stack,
                settings=settings,
                redis=runtime.redis,
                keys=key_source,
                publisher=runtime.publisher,
                spend=SpendMeter(prices),
                budgets=budgets,
                policy=policy.current.voice,
            )
        # One pipelined connection for the per-request admission script.
        # With budgets, a second script carries the reservation (one round trip).
        admission = runtime.closing(
            Admission(
                runtime.redis,
                service="proxy",
                pipelined=True,
                rider=ADMISSION_RIDER if budgets is not None else None,
                failure_modes=dict.fromkeys(RATE_LAYERS, settings.rate_limit_failure_mode),
                block_after_strikes=settings.block_after_strikes,
                strike_window_s=settings.strike_window_s,
                block_for_s=settings.block_for_s,
            )
        )
        cache = None
        if settings.cache_max_entry_bytes:
            cache = ResponseCache(
                runtime.redis_client(settings.response_cache_redis_url),
                ttl_s=settings.cache_ttl_s,
                max_entry_bytes=settings.cache_max_entry_bytes,
            )
        handler = ProxyHandler(
            settings=settings,
            tokens=TokenCache(settings.keyring(), settings.token_cache_size),
            admission=admission,
            forwarder=forwarder,
            cache=cache,
            publisher=runtime.publisher,
            trusted_proxies=parse_networks(settings.trusted_proxies),
            voice=voice,
            policy=RequestPolicy(policy),
            prices=prices,
            budgets=budgets,
        )
        policy.start()
        runtime.stack.push_async_callback(policy.stop)
        if forwarder is not None:
            # Warm the lease cache so the first request does not pay for it.
            runtime.spawn(_warm(key_source), name="warm-lease", drain=False)
        live.handler = handler
        runtime.on_stop(live.stop_accepting)
        if voice is not None:
            # Right after: another replica takes the voice sessions over now.
            runtime.on_stop(voice.let_go)
        runtime.on_drain(handler.drain)

    app = runtime.app("keyveil proxy", build)
    document_routes(app)  # the spec only: _ProxyPaths answers these paths first
    app.add_middleware(CORSMiddleware, **_cors_policy(settings))
    # Added last, so it runs first: proxy requests never enter the FastAPI stack.
    app.add_middleware(_ProxyPaths, live=live, settings=settings)
    return app


async def _warm(keys: KeySource) -> None:
    try:
        await keys.authorization()
    except ApiError as exc:
        log.warning("key lease not available yet (%s)", exc.code)
