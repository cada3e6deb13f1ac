"""The provider side: one pooled HTTP client per process, and what may cross it.

The upstream URL is OPENAI_BASE_URL plus the route's fixed suffix; nothing from the
client's URL is used. Only an allowlist of request headers goes up (never the
client's Authorization), and the provider key goes only into the upstream
Authorization header.

The client is aiohttp (one `ClientSession` per process, a bounded keep-alive pool):
under load httpx/httpcore spent most of the proxy's CPU on connection-pool
bookkeeping, aiohttp's pool and HTTP/1.1 parser cost a fraction of that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp

from shared.errors import ApiError, UpstreamError, UpstreamTimeoutError
from shared.leases import LeaseClient, LeaseReply

from .routes import Route

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "Forwarder",
    "KeySource",
    "OpenedLeaseCache",
    "UpstreamResponse",
    "UpstreamStreamError",
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
_READ_CHUNK = 64 * 1024


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


class UpstreamStreamError(Exception):
    """The provider's body broke off (connection lost, read timeout) mid-stream."""


class UpstreamResponse:
    """An open provider response: status and headers read, the body still streaming."""

    __slots__ = ("_response", "headers", "lease", "status")

    def __init__(self, response: aiohttp.ClientResponse, lease: LeaseReply) -> None:
        self._response = response
        self.status = response.status
        self.lease = lease
        # Lower-cased names; only what a browser may see is ever relayed.
        self.headers: dict[str, str] = {
            name.lower(): value for name, value in response.headers.items()
        }

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    def passthrough_headers(self) -> dict[str, str]:
        """The provider's response headers a browser may see."""
        return {k: v for k, v in self.headers.items() if k in _RESPONSE_HEADERS}

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives (b"" at the end)."""
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamStreamError(type(exc).__name__) from None

    async def read_exactly(self, size: int) -> bytes:
        """Exactly `size` bytes of the body (its declared Content-Length)."""
        try:
            return await self._response.content.readexactly(size)
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise UpstreamStreamError(type(exc).__name__) from None

    async def read_capped(self, limit: int) -> bytes:
        """The body up to `limit` bytes; the rest is left unread."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.readany()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Done with a fully read body: the connection goes back to the pool."""
        self._response.release()

    def abort(self) -> None:
        """Stop now: close the connection, which cancels the call at the provider."""
        self._response.close()


class Forwarder:
    """Sends allowlisted requests to the provider over a bounded keep-alive pool."""

    def __init__(
        self,
        *,
        base_url: str,
        keys: KeySource,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        max_connections: int = 200,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._keys = keys
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections,
                limit_per_host=0,
                keepalive_timeout=30.0,
                ttl_dns_cache=300,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=connect_timeout_s,  # includes waiting for a free pooled connection
                sock_connect=connect_timeout_s,
                sock_read=read_timeout_s,
            ),
            # Relay bytes as the provider sent them; no transparent decompression.
            auto_decompress=False,
            headers={"accept-encoding": "identity", "user-agent": "keyveil-proxy"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def send(
        self,
        route: Route,
        *,
        client_headers: Mapping[str, str],
        content: bytes | AsyncIterator[bytes],
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Open the upstream response (headers read, body still streaming)."""
        authorization, lease = await self._keys.authorization()
        headers = {
            name: client_headers[name]
            for name in FORWARDED_REQUEST_HEADERS
            if name in client_headers
        }
        headers["authorization"] = authorization
        if content_length is not None:
            headers["content-length"] = str(content_length)
        try:
            response = await self._session.post(
                self._base_url + route.upstream_suffix,
                data=content,
                headers=headers,
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamTimeoutError(
                "the provider did not answer in time", code="upstream_timeout"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"the provider is unreachable ({type(exc).__name__})", code="upstream_unreachable"
            ) from None
        return UpstreamResponse(response, lease)
