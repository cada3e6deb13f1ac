"""Each detector fires on its pattern, stays quiet on a normal baseline, and cools down."""

from __future__ import annotations

from services.auditor.detectors import Detectors, Finding
from shared.contract import Refusal
from shared.events import UsageEvent
from shared.eventschema import Refused
from tests.services.auditor.helpers import (
    T0,
    denied,
    issued,
    normal_traffic,
    proxied,
    rotation_due,
    settings,
)


def feed(detectors: Detectors, events: list[UsageEvent]) -> list[Finding]:
    found: list[Finding] = []
    for event in events:
        found.extend(detectors.observe_usage(event))
    return found


def warmed_up() -> Detectors:
    detectors = Detectors(settings())
    assert feed(detectors, normal_traffic(T0, 30)) == []
    return detectors


def test_normal_baseline_raises_nothing() -> None:
    detectors = Detectors(settings())
    assert feed(detectors, normal_traffic(T0, 120)) == []


def test_auth_failure_burst_from_one_ip() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    burst = [denied("signature" if i % 2 else "invalid_token", ts=now + i) for i in range(12)]
    found = [f for f in feed(detectors, burst) if f.type == "auth_failure_burst"]
    assert len(found) == 1, "one incident, one alert (cooldown)"
    assert found[0].labels["client_ip"] == "203.0.113.7"
    assert "10 failed" in found[0].summary


def test_auth_failures_spread_over_ips_or_time_stay_quiet() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    spread_ips = [denied("expired", ts=now + i, ip=f"192.0.2.{i}") for i in range(30)]
    slow = [denied("expired", ts=now + 100 + i * 10, ip="192.0.2.200") for i in range(30)]
    rate_limited = [denied("rate_limited", ts=now + 500 + i, ip="192.0.2.201") for i in range(50)]
    assert feed(detectors, spread_ips + slow + rate_limited) == []


def test_token_generation_per_ip() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    found = feed(detectors, [issued(ts=now + i, ip="203.0.113.50") for i in range(25)])
    assert [f.type for f in found] == ["token_rate_ip"]
    assert found[0].labels["client_ip"] == "203.0.113.50"


def test_token_generation_overall_against_learned_baseline() -> None:
    detectors = warmed_up()  # learned: ~8 tokens a minute
    now = T0 + 30 * 60
    # 60 tokens in one minute, each IP under the per-IP ceiling.
    spike = [issued(ts=now + i, ip=f"203.0.113.{i % 30}") for i in range(60)]
    found = feed(detectors, spike)
    assert [f.type for f in found] == ["token_rate_spike"]
    assert float(found[0].labels["baseline"]) < 12


def test_token_rate_cold_start_does_not_fire_on_first_buckets() -> None:
    detectors = Detectors(settings())
    # 40 tokens in the very first minute: above min_count, no baseline yet, below ceiling.
    assert feed(detectors, [issued(ts=T0 + i, ip=f"192.0.2.{i}") for i in range(40)]) == []


def test_proxy_error_rate() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    outage = [proxied(ts=now + i * 0.5, status=502 if i % 2 else 200) for i in range(40)]
    found = feed(detectors, outage)
    assert [f.type for f in found] == ["proxy_error_rate"]
    assert found[0].severity == "critical"


def test_few_errors_below_minimum_volume_stay_quiet() -> None:
    detectors = Detectors(settings())
    assert feed(detectors, [proxied(ts=T0 + i * 30, status=500) for i in range(5)]) == []


def test_usage_spike_per_key_and_subject() -> None:
    detectors = warmed_up()  # key-openai-1: 12 a minute; tok-0: 3 a minute
    now = T0 + 30 * 60
    spike = [proxied(ts=now + i * 0.5, key_id="key-openai-1", token_id="tok-0") for i in range(80)]
    found = {f.type: f for f in feed(detectors, spike)}
    assert set(found) == {"usage_spike_key", "usage_spike_subject"}
    assert found["usage_spike_key"].labels["key_id"] == "key-openai-1"
    assert found["usage_spike_subject"].labels["token_id"] == "tok-0"


def test_voice_metering_is_not_counted_as_requests() -> None:
    detectors = warmed_up()  # tok-0: 3 requests a minute
    now = T0 + 30 * 60
    ticks = [
        proxied(ts=now + i * 0.5, key_id="key-openai-1", token_id="tok-0", type="voice.usage")
        for i in range(80)
    ]
    assert feed(detectors, ticks) == []  # one voice session, metered every half second


def test_usage_spike_new_key_cold_start_is_robust() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    # A brand-new key's first busy minute is not an anomaly (no baseline to compare).
    assert feed(detectors, [proxied(ts=now + i, key_id="key-new") for i in range(50)]) == []


def test_replay_and_tampering_attempts() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    replays = [denied("replay", ts=now + i, token_id="tok-stolen") for i in range(3)]
    tampered = [denied("digest", ts=now + 10 + i, token_id="tok-x") for i in range(3)]
    found = {f.type: f for f in feed(detectors, replays + tampered)}
    assert set(found) == {"replay_attempts", "tampering_attempts"}
    assert found["replay_attempts"].labels["token_id"] == "tok-stolen"
    assert found["tampering_attempts"].labels["reason"] == "digest"


def test_one_replay_is_not_an_attack() -> None:
    detectors = warmed_up()
    assert feed(detectors, [denied("replay", ts=T0 + 1900, token_id="tok-retry")]) == []


def test_same_token_from_two_countries() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    events = [
        proxied(ts=now, token_id="tok-9", key_id="key-openai-1", country="DE"),
        proxied(ts=now + 60, token_id="tok-9", key_id="key-openai-1", country="de"),
        proxied(ts=now + 120, token_id="tok-9", key_id="key-openai-1", country="BR"),
    ]
    found = feed(detectors, events)
    types = [f.type for f in found]
    assert "geo_token_countries" in types
    geo = next(f for f in found if f.type == "geo_token_countries")
    assert geo.labels["countries"] == "BR,DE"
    # BR is also new for the key, which had learned DE and FR.
    assert "geo_new_country" in types


def test_known_countries_and_unknown_codes_stay_quiet() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    events = [
        proxied(ts=now, token_id="tok-a", key_id="key-openai-1", country="FR"),
        proxied(ts=now + 1, token_id="tok-a", key_id="key-openai-1", country="XX"),
        proxied(ts=now + 2, token_id="tok-a", key_id="key-openai-1", country=None),
    ]
    assert feed(detectors, events) == []


def test_rotation_overdue_once_per_cooldown() -> None:
    detectors = Detectors(settings(rotation_cooldown_s=86_400))
    first = detectors.observe_audit(rotation_due(ts=T0))
    again = detectors.observe_audit(rotation_due(ts=T0 + 3600))
    next_day = detectors.observe_audit(rotation_due(ts=T0 + 90_000))
    assert [f.type for f in first] == ["rotation_overdue"]
    assert "95 days" in first[0].summary
    assert again == []
    assert len(next_day) == 1


def test_cooldown_expires_and_a_new_incident_alerts_again() -> None:
    detectors = Detectors(settings(alert_cooldown_s=300))
    first = feed(detectors, [denied("signature", ts=T0 + i) for i in range(20)])
    later = feed(detectors, [denied("signature", ts=T0 + 400 + i) for i in range(20)])
    assert [f.type for f in first].count("auth_failure_burst") == 1
    assert [f.type for f in later].count("auth_failure_burst") == 1


def test_token_burst_per_user_across_ips() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    burst = [issued(ts=now + i, ip=f"198.51.100.{i % 3 + 10}", user="u_burst") for i in range(22)]
    found = feed(detectors, burst)
    per_user = [f for f in found if f.type == "token_rate_user"]
    assert len(per_user) == 1
    assert per_user[0].labels == {"user": "u_burst"}
    assert not any(f.type == "token_rate_ip" for f in found)  # no single IP stands out


def test_one_user_from_many_ips() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    calm = [issued(ts=now + i * 30, ip="198.51.100.9", user="u_calm") for i in range(10)]
    assert feed(detectors, calm) == []
    spread = [issued(ts=now + i, ip=f"192.0.2.{i + 1}", user="u_shared") for i in range(5)]
    found = feed(detectors, spread)
    assert [f.type for f in found] == ["user_many_ips"]
    assert found[0].labels == {"user": "u_shared", "ips": "5"}
    later = now + 700  # the earlier IPs left the window
    assert feed(detectors, [issued(ts=later, ip="192.0.2.99", user="u_shared")]) == []


def test_an_identity_outage_alerts_once_per_cooldown() -> None:
    detectors = warmed_up()
    now = T0 + 30 * 60
    outage = [
        UsageEvent(
            service="token",
            type="token.error",
            outcome="error",
            reason=Refused.of(Refusal.IDENTITY_UNAVAILABLE),
            status=503,
            ts=now + i,
        )
        for i in range(5)
    ]
    found = feed(detectors, outage)
    assert [(f.type, f.severity) for f in found] == [("identity_unavailable", "critical")]


async def test_sampled_refusals_still_add_up_to_a_burst() -> None:
    """The proxy sends one event per (reason, IP) per interval, with a `count`: the
    detector must weigh it, or a flood of forged tokens would look like a trickle."""
    from shared.refusals import RefusalSampler

    sent: list[UsageEvent] = []
    sampler = RefusalSampler(sent.append, interval_s=60)
    for i in range(25):
        sampler.refused(denied("invalid_token", ts=T0 + i))
    sampler.close()
    assert len(sent) == 2  # the first at once, the other 24 summed
    assert sum(event.count or 1 for event in sent) == 25

    found = [f for f in feed(Detectors(settings()), sent) if f.type == "auth_failure_burst"]
    assert len(found) == 1  # two events, one of them standing for 24: over the 10 threshold


def test_spend_spike_per_app_against_its_baseline() -> None:
    detectors = Detectors(settings())
    events = []
    for minute in range(30):  # shop: about $0.02 a minute, every minute
        for i in range(4):
            events.append(
                proxied(ts=T0 + minute * 60 + i * 10, app="shop", cost_micros=5_000 + 100 * i)
            )
    assert [f for f in feed(detectors, events) if f.type == "spend_spike"] == []
    now = T0 + 30 * 60
    # A voice session burning $0.60 within one minute: metering events, not requests.
    burn = [
        proxied(ts=now + i, app="shop", type="voice.usage", cost_micros=20_000) for i in range(30)
    ]
    found = [f for f in feed(detectors, burn) if f.type == "spend_spike"]
    assert len(found) == 1  # one incident, one alert
    assert found[0].labels["app"] == "shop"
    assert found[0].severity == "warning"
    # A quiet app's first dear minute is no anomaly: no baseline to compare with.
    fresh = [proxied(ts=now + i, app="new", cost_micros=50_000) for i in range(10)]
    assert [f for f in feed(detectors, fresh) if f.type == "spend_spike"] == []
