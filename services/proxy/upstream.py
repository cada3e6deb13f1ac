"""The provider side: one pooled HTTP client per process, and what may cross it.

The upstream URL is OPENAI_BASE_URL plus the route's fixed suffix; nothing from the
client's URL is used. Only an allowlist of request headers goes up (never the
client's Authorization), and the provider key goes only into the upstream
Authorization header.

The client is a `transport.UpstreamTransport` (one bounded keep-alive pool per
process), chosen by UPSTREAM_TRANSPORT: `http1.Http1Pool` for direct egress (under load
httpx/httpcore spent most of the proxy's CPU on connection-pool bookkeeping, and aiohttp
still ~360 us per call where this costs ~80 us), `httpx_transport.HttpxTransport` when an
egress proxy applies to the upstream host.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol
from urllib.parse import urlsplit
from urllib.request import getproxies_environment

from shared.errors import ApiError
from shared.leases import LeaseClient, LeaseReply

from .http1 import Http1Pool
from .httpx_transport import HttpxTransport
from .metrics import count_upstream_status
from .routes import Route
from .transport import (
    TransportKind,
    UpstreamExchange,
    UpstreamStreamError,
    UpstreamTransport,
    choose_transport,
)

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "Forwarder",
    "KeySource",
    "OpenedLeaseCache",
    "UpstreamResponse",
    "UpstreamStreamError",
    "combine_headers",
]

log = logging.getLogger(__name__)

FORWARDED_REQUEST_HEADERS = ("content-type", "accept")
_RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "retry-after",
        "x-request-id",
        "openai-processing-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
    }
)


def combine_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-cased header fields, repeats joined with ", " (RFC 9110), in linear time.

    Joining the string once per repeat copies it every time: quadratic in the number
    of repeats, which one hostile message can make large.
    """
    out: dict[str, str] = {}
    repeats: dict[str, list[str]] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name not in out:
            out[name] = value
        elif name in repeats:
            repeats[name].append(value)
        else:
            repeats[name] = [out[name], value]
    for name, values in repeats.items():
        out[name] = ", ".join(values)
    return out


class KeySource(Protocol):
    async def authorization(self, provider: str = "openai") -> tuple[str, LeaseReply]: ...


class OpenedLeaseCache:
    """Keeps the opened provider key of the current sealed lease in process memory.

    DESIGN TRADE-OFF (a deliberate change from `LeaseClient.authorization`, which opens
    the sealed lease on every call): HPKE-opening the lease costs ~70 us (X25519) to
    ~180 us (ML-KEM-768 + X25519) of CPU, 15-35 % of a worker's budget at 2,000
    requests/s. So the opened `Bearer <key>` value is kept, in this process's memory
    only, for exactly as long as `LeaseClient` keeps the sealed lease it came from:
    until the lease is refreshed before expiry, or dropped on a rotation/revocation
    notice (`keyveil.km.rotated`). Whenever the lease changes or cannot be had, the
    opened value is discarded first, so a revoked or expired key is never reused and
    there is never a fallback to a stale key. The key is never logged, never written
    anywhere and never leaves the process except in the upstream Authorization header.
    What this gives up: a memory dump of a live proxy during a lease's lifetime (at
    most KEYMANAGER_LEASE_TTL_S) shows the key, where before it showed the sealed
    lease plus the HPKE private key that opens it, which is no real difference.
    """

    def __init__(self, leases: LeaseClient) -> None:
        self._leases = leases
        self._opened: dict[str, tuple[str, LeaseReply]] = {}

    async def authorization(self, provider: str = "openai") -> tuple[str, LeaseReply]:
        try:
            _, reply = await self._leases.lease(provider)
        except ApiError:
            self._opened.pop(provider, None)
            raise
        opened = self._opened.get(provider)
        if opened is not None and opened[1] is reply:
            return opened
        self._opened.pop(provider, None)
        opened = await self._leases.authorization(provider)
        self._opened[provider] = opened
        return opened

    def invalidate(self) -> None:
        self._opened.clear()


class UpstreamResponse:
    """An open provider response: status and headers read, the body still streaming."""

    __slots__ = ("_done", "_exchange", "headers", "lease", "status")

    def __init__(self, exchange: UpstreamExchange, lease: LeaseReply) -> None:
        self._exchange = exchange
        self._done = False
        self.status = exchange.status
        self.lease = lease
        # Lower-cased names; only what a browser may see is ever relayed.
        self.headers = combine_headers(exchange.headers)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    def passthrough_headers(self) -> dict[str, str]:
        """The provider's response headers a browser may see."""
        return {k: v for k, v in self.headers.items() if k in _RESPONSE_HEADERS}

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives (b"" at the end); UpstreamStreamError."""
        return await self._exchange.readany()

    async def read_exactly(self, size: int) -> bytes:
        """Exactly `size` bytes of the body (its declared Content-Length)."""
        parts: list[bytes] = []
        got = 0
        while got < size:
            chunk = await self._exchange.readany()
            if not chunk:
                raise UpstreamStreamError("the body ended early")
            parts.append(chunk)
            got += len(chunk)
        if got != size:
            raise UpstreamStreamError("the body is longer than declared")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_capped(self, limit: int) -> bytes:
        """The body up to `limit` bytes; the rest is left unread."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self._exchange.readany()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Done with the body: a cleanly finished connection goes back to the pool."""
        if not self._done:
            self._done = True
            self._exchange.release()

    def abort(self) -> None:
        """Stop now: close the connection, which cancels the call at the provider."""
        if not self._done:
            self._done = True
            self._exchange.abort()


class Forwarder:
    """Sends allowlisted requests to the provider over a bounded keep-alive pool."""

    def __init__(
        self,
        *,
        base_url: str,
        keys: KeySource,
        transport: TransportKind = "auto",
        proxies: Mapping[str, str] | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        max_connections: int = 200,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`proxies` as `urllib.request.getproxies_environment()` reads them (the default);
        ValueError when UPSTREAM_TRANSPORT cannot work with them (Settings checks first)."""
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("the upstream base URL must be an absolute http(s) URL")
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        self._keys = keys
        self._path_prefix = url.path
        choice = choose_transport(
            transport, base_url, getproxies_environment() if proxies is None else proxies
        )
        self.transport_kind = choice.kind
        log.info("upstream transport: %s (%s)", choice.kind, choice.reason)
        # Relay bytes as the provider sent them; no transparent decompression.
        defaults = (("user-agent", "keyveil-proxy"), ("accept-encoding", "identity"))
        self.transport: UpstreamTransport
        if choice.kind == "http1":
            self.transport = Http1Pool(
                host=url.hostname,
                port=port,
                tls=tls,
                default_headers=defaults,
                max_connections=max_connections,
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                keepalive_s=keepalive_s,
                ssl_context=ssl_context,
            )
        else:
            self.transport = HttpxTransport(
                origin=f"{url.scheme}://{url.netloc.rpartition('@')[2]}",
                proxy=choice.proxy,
                default_headers=defaults,
                max_connections=max_connections,
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                keepalive_s=keepalive_s,
                ssl_context=ssl_context,
            )

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def send(
        self,
        route: Route,
        *,
        client_headers: Mapping[str, str],
        content: bytes | AsyncIterator[bytes],
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Open the upstream response (headers read, body still streaming).

        Raises UpstreamError (unreachable) or UpstreamTimeoutError (no answer in time)."""
        authorization, lease = await self._keys.authorization()
        length = len(content) if isinstance(content, bytes) else content_length
        if length is None:
            raise ValueError("a streamed upstream body needs its length")
        headers: list[tuple[str, str]] = []
        for name in FORWARDED_REQUEST_HEADERS:
            value = client_headers.get(name)
            if value is not None and "\r" not in value and "\n" not in value:
                headers.append((name, value))
        headers.append(("authorization", authorization))
        exchange = await self.transport.open(
            "POST", f"{self._path_prefix}{route.upstream_suffix}", headers, content, length
        )
        count_upstream_status(exchange.status)
        return UpstreamResponse(exchange, lease)
