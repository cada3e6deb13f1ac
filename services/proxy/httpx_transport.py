"""The upstream transport on httpx, for deployments whose egress goes through a proxy.

httpx tunnels https through an http(s) egress proxy (CONNECT) and forwards http through
it; the proxy is the one `transport.egress_proxy` found for the upstream host (NO_PROXY
already applied), given explicitly, so the choice logged at start-up is the one used.
It costs far more CPU per call than `http1.Http1Pool` (services/proxy/http1.py):
~860 us against ~47 us client-side for a small JSON answer, measured on a busy 2-core
machine; which is why it is not used without a proxy.

httpx's errors are translated here, and only here, into the transport's
(see services/proxy/transport.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence

import httpx

from shared.errors import UpstreamError, UpstreamTimeoutError

from .transport import EgressProxy, UpstreamStreamError

__all__ = ["HttpxTransport"]


class _HttpxExchange:
    """One open httpx answer, as a `transport.UpstreamExchange`."""

    __slots__ = ("_chunks", "_ended", "_left", "_response", "_transport", "headers", "status")

    def __init__(self, response: httpx.Response, transport: HttpxTransport) -> None:
        self._response = response
        self._transport = transport
        self._chunks = response.aiter_raw()
        self._ended = False
        self.status = response.status_code
        self.headers = response.headers.raw
        length = response.headers.get("content-length")
        self._left = int(length) if length is not None and length.isdigit() else -1

    async def readany(self) -> bytes:
        if self._ended:
            return b""
        try:
            chunk = await anext(self._chunks)
            if self._left >= 0:
                self._left -= len(chunk)
                if self._left <= 0:
                    # The declared length is in: finish the message now, so that the
                    # connection is back in the pool when the caller releases it.
                    await anext(self._chunks, b"")
                    self._ended = True
        except StopAsyncIteration:
            self._ended = True  # httpx closed the response: the connection is back
            return b""
        except (httpx.HTTPError, httpx.StreamError) as exc:
            self._ended = True
            raise UpstreamStreamError(_describe(exc)) from None
        return chunk

    def release(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._left == 0:  # an empty body nobody read: finish it, keep the connection
            self._transport.close_later(self._response, finish=self._chunks)
        else:  # body left unread: the connection cannot carry another request
            self._transport.close_later(self._response)

    def abort(self) -> None:
        self._ended = True
        self._transport.close_later(self._response)


def _describe(exc: Exception) -> str:
    """The error's kind only: its message may reach the client, and could name hosts."""
    return type(exc).__name__


class HttpxTransport:
    """Bounded keep-alive connections to one origin over httpx (see `UpstreamTransport`)."""

    def __init__(
        self,
        *,
        origin: str,
        proxy: EgressProxy | None,
        default_headers: Sequence[tuple[str, str]] = (),
        max_connections: int = 200,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`origin` is scheme://host[:port]; `ssl_context` replaces the system trust store
        (tests only), which http1 uses too (httpx would otherwise use certifi's)."""
        self._origin = origin
        self._default_headers = list(default_headers)
        self._closing: set[asyncio.Task[None]] = set()
        self._client = httpx.AsyncClient(
            # The environment was read once already (`egress_proxy`); not again here.
            trust_env=False,
            proxy=httpx.Proxy(proxy.url) if proxy is not None else None,
            verify=ssl_context or ssl.create_default_context(),
            timeout=httpx.Timeout(
                connect=connect_timeout_s,
                read=read_timeout_s,
                write=read_timeout_s,
                pool=connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_s,
            ),
            follow_redirects=False,
        )

    async def open(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterator[bytes],
        content_length: int,
    ) -> _HttpxExchange:
        # Built directly (not client.build_request): no httpx default headers are added.
        request = httpx.Request(
            method,
            self._origin + target,
            headers=[*self._default_headers, *headers, ("content-length", str(content_length))],
            content=body,
        )
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamError(
                f"the provider is unreachable ({_describe(exc)})", code="upstream_unreachable"
            ) from None
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(
                "the provider did not answer in time", code="upstream_timeout"
            ) from None
        except httpx.TransportError as exc:
            raise UpstreamError(
                f"the provider is unreachable ({_describe(exc)})", code="upstream_unreachable"
            ) from None
        return _HttpxExchange(response, self)

    def close_later(
        self, response: httpx.Response, *, finish: AsyncIterator[bytes] | None = None
    ) -> None:
        """Close an answer from synchronous code (release, abort): httpx closes async.

        With `finish`, the (already complete) message is read to its end first, so that
        the connection goes back to the pool instead of being closed."""

        async def close() -> None:
            if finish is not None:
                with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
                    await anext(finish, b"")
            await response.aclose()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._client.aclose()
