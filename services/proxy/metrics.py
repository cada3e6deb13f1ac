"""Proxy metrics. Labels are bounded: endpoint, status class, reason; never IPs or ids."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram

__all__ = [
    "ADDED_LATENCY",
    "AUTH_FAILURES",
    "CACHE",
    "CANCELLED",
    "REJECTIONS",
    "REQUESTS",
    "REQUEST_DURATION",
    "UPSTREAM_LATENCY",
    "UPSTREAM_RESPONSES",
    "count_upstream_status",
    "status_class",
]

C = TypeVar("C", Counter, Histogram)


def _shared(kind: type[C], name: str, doc: str, labels: list[str], **kw: Any) -> C:
    """Reuse a collector another module in this process already registered under `name`.

    `keyveil_auth_failures_total` is emitted by the token service too, and tests import
    both services into one process.
    """
    existing = REGISTRY._names_to_collectors.get(name)
    if isinstance(existing, kind):
        return existing
    return kind(name, doc, labels, **kw)


_FAST = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUESTS = Counter(
    "keyveil_proxy_requests_total",
    "Proxy requests by endpoint and status class",
    ["endpoint", "status_class"],
)
REJECTIONS = Counter(
    "keyveil_proxy_rejections_total",
    "Requests refused before reaching the upstream, by reason",
    ["reason"],
)
REQUEST_DURATION = Histogram(
    "keyveil_proxy_request_duration_seconds",
    "Whole request time in the proxy, including the upstream and the streamed body",
    ["endpoint"],
    buckets=_SLOW,
)
ADDED_LATENCY = Histogram(
    "keyveil_proxy_added_latency_seconds",
    "Proxy time minus upstream time",
    ["endpoint"],
    buckets=_FAST,
)
UPSTREAM_LATENCY = Histogram(
    "keyveil_proxy_upstream_latency_seconds",
    "Upstream time, from sending the request to the last byte of the answer",
    ["endpoint"],
    buckets=_SLOW,
)
CANCELLED = Counter(
    "keyveil_proxy_upstream_cancelled_total",
    "Streamed provider calls closed early because the client went away",
)
CACHE = Counter("keyveil_proxy_cache_total", "Response cache lookups", ["result"])
AUTH_FAILURES = _shared(
    Counter, "keyveil_auth_failures", "Authentication failures", ["service", "reason"]
)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


UPSTREAM_RESPONSES = Counter(
    "keyveil_proxy_upstream_responses_total",
    "Provider answers by status class and status (429 apart from the other 4xx)",
    ["status_class", "status"],
)
# Statuses OpenAI documents; anything else counts as "other" so the label stays bounded.
_KNOWN_STATUSES = frozenset({200, 400, 401, 403, 404, 408, 409, 413, 415, 422, 429})
_KNOWN_STATUSES |= frozenset({500, 502, 503, 504})


_UPSTREAM_CHILDREN: dict[int, Any] = {}  # status -> bound child (statuses are few)


def count_upstream_status(status: int) -> None:
    """One provider answer, by class and (bounded) status code."""
    child = _UPSTREAM_CHILDREN.get(status)
    if child is None:
        shown = str(status) if status in _KNOWN_STATUSES else "other"
        child = UPSTREAM_RESPONSES.labels(status_class(status), shown)
        if 100 <= status <= 599:  # what a provider can send; bounded either way
            _UPSTREAM_CHILDREN[status] = child
    child.inc()
