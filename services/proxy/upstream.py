"""The provider side: one pooled HTTP client per process, and what may cross it.

The upstream URL is OPENAI_BASE_URL plus the route's fixed suffix; nothing from the
client's URL is used. Only an allowlist of request headers goes up (never the
client's Authorization), and the provider key goes only into the upstream
Authorization header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx

from shared.errors import UpstreamError, UpstreamTimeoutError
from shared.leases import LeaseReply

from .routes import Route

__all__ = ["FORWARDED_REQUEST_HEADERS", "Forwarder", "KeySource", "passthrough_headers"]

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


class KeySource(Protocol):
    async def authorization(self, provider: str = "openai") -> tuple[str, LeaseReply]: ...


def passthrough_headers(response: httpx.Response) -> dict[str, str]:
    """The provider's response headers a browser may see."""
    return {k: v for k, v in response.headers.items() if k in _RESPONSE_HEADERS}


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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._keys = keys
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=connect_timeout_s,
                read=read_timeout_s,
                write=read_timeout_s,
                pool=connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=30.0,
            ),
            # Relay bytes as the provider sent them; no transparent decompression.
            headers={"accept-encoding": "identity", "user-agent": "keyveil-proxy"},
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(
        self,
        route: Route,
        *,
        client_headers: Mapping[str, str],
        content: bytes | AsyncIterator[bytes],
        content_length: int | None = None,
    ) -> tuple[httpx.Response, LeaseReply]:
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
        request = self._client.build_request(
            "POST", self._base_url + route.upstream_suffix, content=content, headers=headers
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(
                "the provider did not answer in time", code="upstream_timeout"
            ) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"the provider is unreachable ({type(exc).__name__})", code="upstream_unreachable"
            ) from None
        return response, lease
