"""Anomaly detectors: each turns a stream of events into findings, with a cooldown.

Detectors are pure (no I/O, event time only) so they can be unit-tested and replayed.
Which events count as what:

- auth failure: a `UsageEvent` with outcome "denied" whose reason is a refusal of
  category auth, tamper or replay (`AUTH_CATEGORIES`); limit, block and policy
  refusals are not. The category is read from the event (`Refused.category`), never
  derived from a spelling: v1 reasons were mapped when the event was read
  (`shared.eventschema.reason_from_v1`);
- token issuance: a "token.issued" event (or any successful token-service event with
  a mode); with a principal (`user`, a keyed hash) it also counts per user and per
  user's client IPs;
- identity outage: a token-service error with reason "identity_unavailable" (the
  IdP's JWKS unreachable and no key cached: logins are refused with 503);
- proxy request: a proxy event that was not refused at the door (outcome ok/error);
  an error is outcome "error" or a 5xx status; voice metering ("voice.usage", many per
  session, and its "voice.budget.warning") is not a request: the session's set-up was
  one already;
- replay: a refusal of category replay; tampering: category tamper (a signature or
  digest that does not match);
- rotation overdue: an `AuditEvent` of type "rotation_due" from the key-manager (its
  `RotationDue` detail gives the age).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from services.auditor.baselines import (
    Baseline,
    BoundedMap,
    Cooldown,
    RatioWindow,
    WindowCounter,
)
from services.auditor.settings import Settings
from shared.contract import Category, Refusal
from shared.events import AuditEvent, UsageEvent
from shared.eventschema import OtherReason, Refused, RotationDue, StreamDrift

# Usage events that meter a running session rather than record a request.
METERING_TYPES = frozenset({"voice.usage", "voice.budget.warning"})

__all__ = ["ALERT_TYPES", "AUTH_CATEGORIES", "Detectors", "Finding"]

Severity = Literal["info", "warning", "critical"]

# Categories (`shared.contract.Category`) of the refusals each detector counts.
AUTH_CATEGORIES = frozenset({Category.auth, Category.tamper, Category.replay})
REPLAY_CATEGORIES = frozenset({Category.replay})
TAMPER_CATEGORIES = frozenset({Category.tamper})
TOKEN_ISSUED_TYPES = frozenset({"token.issued", "token.issue"})
ROTATION_DUE_TYPES = frozenset({"rotation_due", "key.rotation_due", "keymanager.rotation_due"})
BUS_DROPPED_TYPES = frozenset({"lease_dropped", "admin_dropped"})

ALERT_TYPES = (
    "auth_failure_burst",
    "token_rate_ip",
    "token_rate_spike",
    "token_rate_user",
    "user_many_ips",
    "identity_unavailable",
    "proxy_error_rate",
    "usage_spike_key",
    "usage_spike_subject",
    "spend_spike",
    "replay_attempts",
    "tampering_attempts",
    "geo_token_countries",
    "geo_new_country",
    "rotation_overdue",
)


@dataclass(frozen=True)
class Finding:
    """A detector's verdict before cooldown: what, how bad, about whom."""

    type: str
    severity: Severity
    subject: str
    summary: str
    ts: float
    labels: dict[str, str] = field(default_factory=dict)
    cooldown_s: float | None = None


def _country(value: str | None) -> str | None:
    if not value:
        return None
    code = value.strip().upper()
    # "XX"/"ZZ" mean unknown at most ingresses; they prove nothing about a location.
    if len(code) != 2 or not code.isalpha() or code in ("XX", "ZZ"):
        return None
    return code


def _refusal(event: UsageEvent) -> tuple[Category | None, str]:
    """The refusal's category and code (a label); a reason of an unknown kind keeps its
    category, so a newer producer's refusals still count."""
    reason = event.reason
    if isinstance(reason, Refused):
        return reason.category, str(reason.code)
    if isinstance(reason, OtherReason):
        return reason.category, reason.kind
    return None, ""


class Detectors:
    """All detectors, fed event by event; `observe_*` returns the findings that passed cooldown."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self.settings = s
        cap = s.max_tracked
        self.cooldown = Cooldown(cap)
        self.auth_failures = WindowCounter(s.auth_failure_window_s, s.auth_failure_threshold, cap)
        self.token_per_ip = WindowCounter(s.token_window_s, s.token_ip_threshold, cap)
        self.token_overall = self._baseline(min_count=s.token_rate_min_count)
        self.token_per_user = WindowCounter(s.token_window_s, s.token_user_threshold, cap)
        self.user_ips: BoundedMap[dict[str, float]] = BoundedMap(cap)
        self.proxy_errors = RatioWindow(s.proxy_error_window_s)
        self.key_usage: BoundedMap[Baseline] = BoundedMap(cap)
        self.subject_usage: BoundedMap[Baseline] = BoundedMap(cap)
        self.app_spend: BoundedMap[Baseline] = BoundedMap(cap)
        self.replays = WindowCounter(s.replay_window_s, s.replay_threshold, cap)
        self.tampering = WindowCounter(s.replay_window_s, s.tamper_threshold, cap)
        self.token_countries: BoundedMap[dict[str, float]] = BoundedMap(cap)
        self.key_countries: BoundedMap[dict[str, int]] = BoundedMap(cap)

    def _baseline(self, *, min_count: int) -> Baseline:
        s = self.settings
        return Baseline(
            bucket_s=s.baseline_bucket_s,
            alpha=s.baseline_alpha,
            warmup=s.baseline_warmup_buckets,
            z_threshold=s.spike_z,
            min_count=min_count,
            cold_ceiling=min_count * 10,
        )

    # -- entry points --------------------------------------------------------------------

    def observe_usage(self, event: UsageEvent) -> list[Finding]:
        findings: list[Finding] = []
        if event.outcome == "denied":
            findings.extend(self._denied(event))
        elif event.type in TOKEN_ISSUED_TYPES or (
            event.service == "token" and event.outcome == "ok" and event.mode is not None
        ):
            findings.extend(self._token_issued(event))
        elif event.service == "proxy" and event.type not in METERING_TYPES:
            findings.extend(self._proxy_request(event))
        elif (
            event.service == "token"
            and isinstance(event.reason, Refused)
            and event.reason.code is Refusal.IDENTITY_UNAVAILABLE
        ):
            findings.append(
                Finding(
                    "identity_unavailable",
                    "critical",
                    "token",
                    "logins cannot be checked: the identity provider's JWKS is unreachable "
                    "and no key is cached (token requests answer 503)",
                    event.ts,
                    {"service": event.service},
                )
            )
        if event.cost_micros:
            findings.extend(self._spend(event))
        findings.extend(self._geography(event))
        return self._pass_cooldown(findings)

    def observe_audit(self, event: AuditEvent) -> list[Finding]:
        """Rotation overdue, stream drift, and requests the key-manager had to drop."""
        findings: list[Finding] = []
        if event.type in ROTATION_DUE_TYPES:
            key = event.key_id or "unknown"
            env = event.environment or "unknown"
            summary = f"key {key} ({event.provider or 'provider'}, {env}) is overdue for rotation"
            if isinstance(event.detail, RotationDue):
                summary += f": {round(event.detail.age_s / 86_400, 1):g} days old"
            findings.append(
                Finding(
                    "rotation_overdue",
                    "warning",
                    f"{key}:{env}",
                    summary,
                    event.ts,
                    {"key_id": key, "environment": env, "provider": event.provider or ""},
                    cooldown_s=self.settings.rotation_cooldown_s,
                )
            )
        if event.type == "stream.drift":
            drift = event.detail
            names = "unknown"
            if isinstance(drift, StreamDrift):
                names = ", ".join(sorted(drift.streams))
            findings.append(
                Finding(
                    "stream_config_drift",
                    "critical",
                    f"{event.service}:{names}",
                    f"{event.service} found JetStream streams missing or changed: {names} "
                    "(run `keyveil bootstrap --check`)",
                    event.ts,
                    {"service": event.service, "streams": names},
                )
            )
        if event.type in BUS_DROPPED_TYPES:
            findings.append(
                Finding(
                    "bus_reply_refused",
                    "critical",
                    event.type,
                    f"the key-manager dropped a request with a forbidden reply subject "
                    f"({event.type}): a NATS login is misused",
                    event.ts,
                    {"service": event.service, "type": event.type},
                )
            )
        return self._pass_cooldown(findings)

    # -- detectors -----------------------------------------------------------------------

    def _denied(self, event: UsageEvent) -> Iterable[Finding]:
        category, reason = _refusal(event)
        ip = event.client_ip or "unknown"
        s = self.settings
        weight = event.count or 1  # a sampled refusal event stands for `count` refusals
        if category in AUTH_CATEGORIES:
            count = self.auth_failures.add(ip, event.ts, weight)
            if count >= s.auth_failure_threshold:
                yield Finding(
                    "auth_failure_burst",
                    "warning",
                    ip,
                    f"{count} failed authentications from {ip} within "
                    f"{s.auth_failure_window_s:g}s (last reason: {reason})",
                    event.ts,
                    {"client_ip": ip, "reason": reason, "service": event.service},
                )
        who = f"token:{event.token_id}" if event.token_id else f"ip:{ip}"
        if category in REPLAY_CATEGORIES:
            count = self.replays.add(who, event.ts, weight)
            if count >= s.replay_threshold:
                yield Finding(
                    "replay_attempts",
                    "critical",
                    who,
                    f"{count} replayed requests for {who} within {s.replay_window_s:g}s",
                    event.ts,
                    self._who_labels(event),
                )
        if category in TAMPER_CATEGORIES:
            count = self.tampering.add(who, event.ts, weight)
            if count >= s.tamper_threshold:
                yield Finding(
                    "tampering_attempts",
                    "critical",
                    who,
                    f"{count} requests with a bad {reason} for {who} within {s.replay_window_s:g}s",
                    event.ts,
                    {**self._who_labels(event), "reason": reason},
                )

    def _token_issued(self, event: UsageEvent) -> Iterable[Finding]:
        s = self.settings
        ip = event.client_ip or "unknown"
        count = self.token_per_ip.add(ip, event.ts)
        if count >= s.token_ip_threshold:
            yield Finding(
                "token_rate_ip",
                "warning",
                ip,
                f"{count} tokens issued to {ip} within {s.token_window_s:g}s",
                event.ts,
                {"client_ip": ip},
            )
        if event.user:
            yield from self._user_issued(event.user, ip, event.ts)
        verdict = self.token_overall.add(event.ts)
        if verdict.spike:
            baseline = self.token_overall.stats.mean
            yield Finding(
                "token_rate_spike",
                "warning",
                "overall",
                f"{verdict.count:g} tokens issued in the current {s.baseline_bucket_s:g}s "
                f"bucket against a baseline of {baseline:.1f}",
                event.ts,
                {"count": f"{verdict.count:g}", "baseline": f"{baseline:.1f}"},
            )

    def _user_issued(self, user: str, ip: str, ts: float) -> Iterable[Finding]:
        s = self.settings
        count = self.token_per_user.add(user, ts)
        if count >= s.token_user_threshold:
            yield Finding(
                "token_rate_user",
                "warning",
                user,
                f"{count} tokens issued to user {user} within {s.token_window_s:g}s",
                ts,
                {"user": user},
            )
        seen = self.user_ips.get(user)
        if seen is None:
            seen = {}
            self.user_ips.put(user, seen)
        seen[ip] = ts
        for old in [a for a, t in seen.items() if ts - t > s.user_ip_window_s]:
            del seen[old]
        if len(seen) > 4 * s.user_ip_threshold:  # bounded: keep the newest
            for old in sorted(seen, key=seen.__getitem__)[: len(seen) - 4 * s.user_ip_threshold]:
                del seen[old]
        if len(seen) >= s.user_ip_threshold:
            yield Finding(
                "user_many_ips",
                "warning",
                user,
                f"user {user} got tokens from {len(seen)} client IPs within "
                f"{s.user_ip_window_s:g}s (a shared or stolen login?)",
                ts,
                {"user": user, "ips": str(len(seen))},
            )

    def _proxy_request(self, event: UsageEvent) -> Iterable[Finding]:
        s = self.settings
        bad = event.outcome == "error" or (event.status or 0) >= 500
        ratio = self.proxy_errors.add(event.ts, bad=bad, weight=event.count or 1)
        if self.proxy_errors.total >= s.proxy_error_min_requests and ratio >= s.proxy_error_ratio:
            yield Finding(
                "proxy_error_rate",
                "critical",
                "proxy",
                f"{ratio:.0%} of {self.proxy_errors.total} proxied requests failed within "
                f"{s.proxy_error_window_s:g}s",
                event.ts,
                {"ratio": f"{ratio:.3f}", "requests": str(self.proxy_errors.total)},
            )
        for kind, ident, table in (
            ("usage_spike_key", event.key_id, self.key_usage),
            ("usage_spike_subject", event.token_id or event.session_id, self.subject_usage),
        ):
            if not ident:
                continue
            baseline = table.get(ident)
            if baseline is None:
                baseline = self._baseline(min_count=s.spike_min_count)
                table.put(ident, baseline)
            verdict = baseline.add(event.ts)
            if verdict.spike:
                label = "key_id" if kind == "usage_spike_key" else "token_id"
                yield Finding(
                    kind,
                    "warning",
                    ident,
                    f"{verdict.count:g} requests for {label} {ident} in the current "
                    f"{s.baseline_bucket_s:g}s bucket against a baseline of "
                    f"{baseline.stats.mean:.1f}",
                    event.ts,
                    {label: ident, "count": f"{verdict.count:g}"},
                )

    def _spend(self, event: UsageEvent) -> Iterable[Finding]:
        """Provider spend per app (micro-dollars per bucket) against its learned baseline;
        voice metering counts too: it is where live-voice money goes."""
        s = self.settings
        app = event.app or "none"
        baseline = self.app_spend.get(app)
        if baseline is None:
            baseline = self._baseline(min_count=s.spend_min_micros)
            self.app_spend.put(app, baseline)
        verdict = baseline.add(event.ts, float(event.cost_micros or 0))
        if verdict.spike:
            yield Finding(
                "spend_spike",
                "warning",
                app,
                f"${verdict.count / 1e6:.4f} spent by app {app} in the current "
                f"{s.baseline_bucket_s:g}s bucket against a baseline of "
                f"${baseline.stats.mean / 1e6:.4f}",
                event.ts,
                {"app": app, "micros": f"{verdict.count:.0f}"},
            )

    def _geography(self, event: UsageEvent) -> Iterable[Finding]:
        country = _country(event.country)
        if country is None or event.outcome == "denied":
            return
        s = self.settings
        if event.token_id:
            seen = self.token_countries.get(event.token_id)
            if seen is None:
                seen = {}
                self.token_countries.put(event.token_id, seen)
            seen[country] = event.ts
            recent = sorted(c for c, t in seen.items() if event.ts - t <= s.geo_token_window_s)
            if len(recent) > 1:
                yield Finding(
                    "geo_token_countries",
                    "critical",
                    event.token_id,
                    f"token {event.token_id} used from {', '.join(recent)} within "
                    f"{s.geo_token_window_s:g}s",
                    event.ts,
                    {"token_id": event.token_id, "countries": ",".join(recent)},
                )
        if event.key_id:
            counts = self.key_countries.get(event.key_id)
            if counts is None:
                counts = {}
                self.key_countries.put(event.key_id, counts)
            learned = sum(counts.values()) >= s.geo_key_warmup_events
            if learned and country not in counts:
                yield Finding(
                    "geo_new_country",
                    "warning",
                    f"{event.key_id}:{country}",
                    f"key {event.key_id} used from a new country {country} "
                    f"(known: {', '.join(sorted(counts))})",
                    event.ts,
                    {"key_id": event.key_id, "country": country},
                )
            if len(counts) < 250 or country in counts:
                counts[country] = counts.get(country, 0) + 1

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _who_labels(event: UsageEvent) -> dict[str, str]:
        labels = {"client_ip": event.client_ip or "unknown", "service": event.service}
        if event.token_id:
            labels["token_id"] = event.token_id
        return labels

    def _pass_cooldown(self, findings: list[Finding]) -> list[Finding]:
        passed = []
        for finding in findings:
            cooldown = (
                finding.cooldown_s
                if finding.cooldown_s is not None
                else self.settings.alert_cooldown_s
            )
            if self.cooldown.allow(f"{finding.type}|{finding.subject}", finding.ts, cooldown):
                passed.append(finding)
        return passed
