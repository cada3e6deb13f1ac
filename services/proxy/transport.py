"""The upstream transport: what the Forwarder needs from an HTTP client, and which one runs.

Two implementations, one conformance suite (tests/services/proxy/test_transport.py):

- `http1.Http1Pool`: the proxy's own HTTP/1.1 client, the fast path (direct egress only);
- `httpx_transport.HttpxTransport`: httpx, which tunnels through an egress proxy
  (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY with an http:// proxy URL, NO_PROXY honoured).

`UPSTREAM_TRANSPORT=auto` (the default) picks httpx exactly when an egress proxy applies
to the upstream host, else http1. Errors, the same for both:

    shared.errors.UpstreamError          no answer: unreachable, refused, TLS, bad HTTP,
                                         no free pool slot in time (code upstream_unreachable)
    shared.errors.UpstreamTimeoutError   connected, but the provider did not take the
                                         request or answer in time (code upstream_timeout)
    UpstreamStreamError                  the answer's body broke off (connection lost,
                                         read timeout) after its head arrived
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

__all__ = [
    "MAX_RESPONSE_HEAD_BYTES",
    "EgressProxy",
    "EgressProxyError",
    "TransportChoice",
    "TransportKind",
    "UpstreamExchange",
    "UpstreamStreamError",
    "UpstreamTransport",
    "choose_transport",
    "egress_proxy",
]

TransportKind = Literal["auto", "http1", "httpx"]

# A response head (status line and header fields) larger than this is refused: a hostile
# or broken upstream must not make the proxy buffer without bound. httpcore's own limit.
MAX_RESPONSE_HEAD_BYTES = 100 * 1024


class EgressProxyError(ValueError):
    """The egress proxy that applies to the upstream cannot be used as configured."""

    def __init__(self, variable: str, rule: str) -> None:
        self.variable = variable
        self.rule = rule
        super().__init__(f"{variable}: {rule}")


class UpstreamStreamError(Exception):
    """The provider's body broke off (connection lost, read timeout) mid-stream."""


class UpstreamExchange(Protocol):
    """One open answer: status and raw header fields read, the body still streaming.

    Exactly one of `release` or `abort` ends it (either may be called again, harmlessly).
    """

    status: int
    headers: list[tuple[bytes, bytes]]

    async def readany(self) -> bytes:
        """The body received so far, as it arrives (b"" at its end); UpstreamStreamError."""
        ...

    def release(self) -> None:
        """Done with the body: a cleanly finished connection is kept for reuse, else closed."""
        ...

    def abort(self) -> None:
        """Close the connection now (the provider learns that the call is cancelled)."""
        ...


class UpstreamTransport(Protocol):
    """A bounded pool of connections to one origin (scheme, host, port)."""

    async def open(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterator[bytes],
        content_length: int,
    ) -> UpstreamExchange:
        """Send one request (`target` is the path; Host and Content-Length are added) and
        wait for the answer's head. Raises UpstreamError or UpstreamTimeoutError."""
        ...

    async def aclose(self) -> None:
        """Close idle connections; answers still open are closed when they end."""
        ...


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """The egress proxy configured for the upstream: the variable that set it and its URL."""

    variable: str
    url: str = field(repr=False)  # may carry credentials

    @property
    def address(self) -> str:
        """scheme://host:port, never the credentials a proxy URL may carry (for logs)."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"

    @property
    def tunnels(self) -> bool:
        """httpx tunnels through http(s) proxies; SOCKS needs an extra it does not have."""
        return urlsplit(self.url).scheme in ("http", "https")


def _bypassed(host: str, no_proxy: str) -> bool:
    """NO_PROXY as curl and httpx read it: `*`, a host, or a domain suffix."""
    host = host.lower().rstrip(".")
    for entry in (part.strip().lower().rstrip(".") for part in no_proxy.split(",")):
        if entry == "*" or (
            entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))
        ):
            return True
    return False


def egress_proxy(base_url: str, proxies: Mapping[str, str]) -> EgressProxy | None:
    """The egress proxy that applies to the upstream host, from `getproxies_environment()`."""
    upstream = urlsplit(base_url)
    scheme = upstream.scheme or "https"
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or _bypassed(upstream.hostname or "", proxies.get("no", "")):
        return None
    variable = "ALL_PROXY" if not proxies.get(scheme) else f"{scheme.upper()}_PROXY"
    # curl and httpx's own reading take `host:port` to mean an http:// proxy.
    return EgressProxy(variable, proxy if "://" in proxy else f"http://{proxy}")


@dataclass(frozen=True, slots=True)
class TransportChoice:
    """The transport in use, why (for the one start-up log line), and its egress proxy."""

    kind: Literal["http1", "httpx"]
    reason: str
    proxy: EgressProxy | None


def choose_transport(
    setting: TransportKind, base_url: str, proxies: Mapping[str, str]
) -> TransportChoice:
    """Resolve UPSTREAM_TRANSPORT; EgressProxyError when the egress proxy cannot be used."""
    host = urlsplit(base_url).hostname
    proxy = egress_proxy(base_url, proxies)
    if proxy is not None and not proxy.tunnels:
        raise EgressProxyError(
            proxy.variable,
            f"a {urlsplit(proxy.url).scheme} proxy, which the upstream client cannot use: "
            f"give an http:// proxy, or list {host} in NO_PROXY",
        )
    if setting == "http1":
        if proxy is not None:
            raise EgressProxyError(
                proxy.variable,
                f"applies to {host}, but UPSTREAM_TRANSPORT=http1 connects directly: set "
                f"UPSTREAM_TRANSPORT=auto or httpx, or list {host} in NO_PROXY",
            )
        return TransportChoice("http1", "UPSTREAM_TRANSPORT=http1", None)
    if setting == "httpx":
        via = f", via {proxy.address} ({proxy.variable})" if proxy else ", direct"
        return TransportChoice("httpx", f"UPSTREAM_TRANSPORT=httpx{via}", proxy)
    if proxy is not None:
        return TransportChoice(
            "httpx", f"{proxy.variable} applies to {host}: via {proxy.address}", proxy
        )
    return TransportChoice("http1", f"no egress proxy applies to {host}", None)
