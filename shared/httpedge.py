"""The HTTP edge every service shares: health, readiness, metrics, errors, client IP.

Every error leaves as `{"error": {"code", "message"}}` with a stable code; nothing
from the request is echoed and no stack trace is ever sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import platform
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import STARTUP_FAILURE

from shared.errors import (
    ApiError,
    PayloadTooLargeError,
    RequestTimeoutError,
    error_body,
)
from shared.httpprotocol import EdgeProtocol, JsonParseErrorProtocol, ProtocolLimits
from shared.settings import CommonSettings, EdgeSettings, settings_or_exit
from shared.telemetry import configure_logging, configure_tracing

__all__ = [
    "BUILD_INFO",
    "IpNetwork",
    "JsonParseErrorProtocol",
    "ReadinessCheck",
    "add_edge_routes",
    "client_ip",
    "error_response",
    "from_trusted_proxy",
    "install_error_handlers",
    "parse_networks",
    "protocol_limits",
    "read_body_capped",
    "record_build_info",
    "run_service",
    "serve_main",
    "service_app",
    "settings_or_exit",
    "signed_scheme",
    "uvicorn_config",
]

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)

ReadinessCheck = Callable[[], Awaitable[bool]]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def service_app(title: str, lifespan: Any) -> FastAPI:
    """A service's FastAPI app: no public docs or schema, every error a JSON error."""
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to a JSON error with a stable code."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # Name the fields and the rule; never echo the input.
        problems = [
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
            f"{err.get('msg', 'invalid')}"
            for err in exc.errors()[:5]
        ]
        return error_response(400, "invalid_request", "; ".join(problems) or "invalid request")

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return error_response(exc.status_code, code, message, dict(exc.headers or {}))

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal_error", "internal error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


BUILD_INFO = Gauge(
    "keyveil_build_info",
    "1 for the running build: which service, keyveil version and Python version",
    ["service", "version", "python"],
    multiprocess_mode="max",
)


def record_build_info(service: str) -> None:
    from importlib import metadata

    try:
        version = metadata.version("keyveil")
    except metadata.PackageNotFoundError:
        version = "unknown"
    BUILD_INFO.labels(service, version, platform.python_version()).set(1)


def _metrics_payload() -> bytes:
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


def add_edge_routes(app: FastAPI, checks: dict[str, ReadinessCheck]) -> None:
    """`/healthz` (alive), `/readyz` (every dependency answers) and `/metrics`."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        # Which process answered: `keyveil up` counts a service ready only when its own
        # child answers, not whatever else holds the port.
        return {"status": "ok", "instance": f"{socket.gethostname()}:{os.getpid()}"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        results: dict[str, bool] = {}
        for name, check in checks.items():
            try:
                results[name] = await check()
            except Exception:  # a failing probe means "not ready", whatever it raised
                results[name] = False
        ready = all(results.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": results},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(_metrics_payload(), media_type=CONTENT_TYPE_LATEST)


def parse_networks(values: Sequence[str]) -> list[IpNetwork]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[IpNetwork]) -> str:
    """The client address: the socket peer, unless it is a trusted proxy.

    Behind trusted proxies, walk X-Forwarded-For from the right, skipping trusted
    hops; the first untrusted address is the client. A spoofed header from an
    untrusted peer is ignored entirely.
    """
    if not peer:
        return "unknown"
    if not trusted or not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # garbage in the chain: trust nothing from it
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def from_trusted_proxy(
    peer: str | None, value: str | None, trusted: Sequence[IpNetwork]
) -> str | None:
    """A header set by the ingress (`X-Forwarded-Proto`, a country), only if `peer` is one."""
    if not value or not peer or not _is_trusted(peer, trusted):
        return None
    return value.split(",")[0].strip() or None


def country_code(value: str | None) -> str | None:
    """An ISO 3166 alpha-2 code from an ingress header; "XX"/"T1"-style unknowns are None."""
    if not value:
        return None
    code = value.strip().upper()
    if len(code) != 2 or not code.isalpha() or code in ("XX", "ZZ"):
        return None
    return code


def signed_scheme(
    scheme: str, peer: str | None, forwarded_proto: str | None, trusted: Sequence[IpNetwork]
) -> str:
    """The scheme the client signed: behind a trusted TLS-terminating ingress, its https."""
    forwarded = from_trusted_proxy(peer, forwarded_proto, trusted)
    return forwarded.lower() if forwarded else scheme


def _is_trusted(address: str, trusted: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


async def read_body_capped(request: Request, limit: int, timeout_s: float = 10.0) -> bytes:
    """Read the body, refusing with 413 as soon as it exceeds `limit` bytes, and with
    408 `body_timeout` when it is not all there within `timeout_s` (a held body)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            "the request body did not arrive in time", headers={"Connection": "close"}
        ) from None
    return b"".join(chunks)


def serve_main(service: str, model: type[S], create_app: Callable[[S], FastAPI]) -> None:
    """A service's whole `main()`: settings (or exit 2), logs, traces, serve until SIGTERM."""
    settings = settings_or_exit(model)
    record_build_info(service)
    configure_logging(service, level=settings.log_level, fmt=settings.log_format)
    configure_tracing(service)
    run_service(create_app(settings), settings)


def protocol_limits(settings: CommonSettings) -> ProtocolLimits:
    """The HTTP bounds of a service: the edges' settings, defaults elsewhere."""
    if not isinstance(settings, EdgeSettings):
        return ProtocolLimits()
    return ProtocolLimits(
        max_header_count=settings.max_header_count,
        max_header_bytes=settings.max_header_bytes,
        max_url_bytes=settings.max_url_bytes,
        header_timeout_s=settings.header_timeout_s,
        write_timeout_s=settings.write_timeout_s,
    )


def uvicorn_config(app: Any, settings: CommonSettings) -> uvicorn.Config:
    """How every edge runs under uvicorn: the bounded protocol, no access log, uvloop."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # client_ip() applies TRUSTED_PROXIES itself
        timeout_graceful_shutdown=10,
        loop="uvloop",
        http=EdgeProtocol.bounded(protocol_limits(settings)),
    )


def run_service(app: FastAPI, settings: CommonSettings) -> None:
    """Serve `app` until SIGTERM/SIGINT; uvicorn then runs the lifespan shutdown (drain)."""
    server = uvicorn.Server(uvicorn_config(app, settings))
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
