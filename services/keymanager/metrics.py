"""Prometheus metrics of the key-manager: bounded labels only (no key ids, no addresses)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ADMIN_OPERATIONS",
    "DATA_KEY_CACHE",
    "DECRYPT_SECONDS",
    "INTEGRITY_FAILURES",
    "KEK_ERRORS",
    "KEK_READY",
    "KEK_SECONDS",
    "KEY_AGE_SECONDS",
    "LEASES",
    "LEASE_SECONDS",
    "REQUESTER_LEASES",
]

LEASES = Counter(
    "keyveil_keymanager_leases_total", "Lease requests answered, by result", ["result"]
)
REQUESTER_LEASES = Counter(
    "keyveil_keymanager_requester_leases_total",
    "Lease requests by requester identity (allow-listed names, else `other`)",
    ["requester", "result"],
)
DECRYPT_SECONDS = Histogram(
    "keyveil_keymanager_decrypt_seconds",
    "Time to unwrap a data key and decrypt a key record",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
LEASE_SECONDS = Histogram(
    "keyveil_keymanager_lease_seconds",
    "Time to answer a lease request, from receipt to reply",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
KEY_AGE_SECONDS = Gauge(
    "keyveil_keymanager_key_age_seconds",
    "Age of the newest active key per environment and provider",
    ["environment", "provider"],
)
ADMIN_OPERATIONS = Counter(
    "keyveil_keymanager_admin_operations_total",
    "Admin requests, by operation and result",
    ["op", "result"],
)
INTEGRITY_FAILURES = Counter(
    "keyveil_keymanager_integrity_failures_total",
    "Key records that did not decrypt, by reason",
    ["reason"],
)
KEK_READY = Gauge(
    "keyveil_keymanager_kek_ready",
    "1 when the custody record opened under the configured KEK provider, else 0",
)
KEK_ERRORS = Counter(
    "keyveil_keymanager_kek_errors_total",
    "KEK provider failures, by provider and kind (unavailable, unwrap, custody)",
    ["provider", "kind"],
)
KEK_SECONDS = Histogram(
    "keyveil_keymanager_kek_seconds",
    "Time of a KEK provider call (wrap, unwrap, rewrap)",
    ["provider", "op"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
)
DATA_KEY_CACHE = Counter(
    "keyveil_keymanager_data_key_cache_total",
    "Unwrapped data-key cache lookups (remote KEK providers), by result",
    ["result"],
)
