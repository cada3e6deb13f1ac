"""Voice metrics. Labels are bounded (api, reason, action): never token or session ids."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BILLABLE_SECONDS",
    "ENDED",
    "LIVE",
    "POLICY_ACTIONS",
    "RECONNECTS",
    "SETUP_LATENCY",
    "TAKEOVERS",
    "TOKENS",
]

LIVE = Gauge(
    "keyveil_voice_sessions_live", "Voice sessions whose sideband this replica holds", ["api"]
)
SETUP_LATENCY = Histogram(
    "keyveil_voice_session_setup_seconds",
    "Broker round trip: request received to SDP answer sent, upstream included",
    ["api"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECONNECTS = Counter(
    "keyveil_voice_sideband_reconnects_total",
    "Sideband re-attaches (after a dropped connection or a replica takeover)",
    ["api"],
)
TAKEOVERS = Counter(
    "keyveil_voice_sideband_takeovers_total",
    "Sessions this replica claimed after their owner's lease expired",
    ["api"],
)
BILLABLE_SECONDS = Counter(
    "keyveil_voice_billable_seconds_total", "Billable voice seconds reported upstream", ["api"]
)
TOKENS = Counter("keyveil_voice_tokens_total", "Realtime tokens reported by response.done", ["api"])
ENDED = Counter(
    "keyveil_voice_sessions_ended_total",
    "Voice sessions ended, by reason (token_revoked, operator, max_duration, ...)",
    ["api", "reason"],
)
POLICY_ACTIONS = Counter(
    "keyveil_voice_policy_actions_total",
    "session.updated outside policy, by what was done (reverted or closed)",
    ["api", "action"],
)
