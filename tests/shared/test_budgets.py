"""Budgets against a real Redis: reserve, refuse, settle, expire, fail closed or open."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared.budgets import (
    ADMISSION_RIDER,
    CONFIG_KEY,
    INDEX_FIELD,
    BudgetAdmin,
    BudgetExceeded,
    Budgets,
    BudgetUnavailable,
    Estimate,
    Hold,
    Metered,
    VoiceCharge,
    counter_key,
    window_index,
)
from shared.ratelimit import Admission, FailureMode, Limit, nonce_key, rate_key
from shared.ratelimit import redis_client as make_client
from tests.support import free_port


@pytest.fixture
async def admin(redis_client: aioredis.Redis) -> AsyncIterator[BudgetAdmin]:
    await redis_client.delete(CONFIG_KEY)
    yield BudgetAdmin(redis_client)
    await redis_client.delete(CONFIG_KEY)


def _user() -> str:
    return uuid.uuid4().hex


async def test_reservations_fit_the_limit_and_settle_to_real_usage(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    await admin.set("user", user, "micros", "day", 1000)
    budgets = Budgets(redis_client)
    subjects = [("token", "t1"), ("user", user)]
    first = await budgets.reserve(subjects=subjects, estimate=Estimate(tokens=10, micros=600))
    assert first is not None
    # 600 held + 600 more would pass 1000: refused, naming the budget, nothing held.
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(subjects=subjects, estimate=Estimate(tokens=10, micros=600))
    assert refused.value.name == "user-micros-day"
    assert refused.value.remaining == 400
    headers = refused.value.headers()
    assert headers["RateLimit-Policy"] == '"budget-user-micros-day";q=1000;w=86400'
    assert headers["RateLimit"].startswith('"budget-user-micros-day";r=400;t=')
    # The call really cost 250: the reservation goes, the real cost stays.
    await budgets.settle(first, tokens=10, micros=250)
    [state] = await admin.show()
    assert (state.used, state.held, state.limit) == (250, 0, 1000)
    second = await budgets.reserve(subjects=subjects, estimate=Estimate(tokens=10, micros=600))
    assert second is not None
    await budgets.settle(second, tokens=10, micros=0)
    key = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    assert int(await redis_client.get(key) or 0) == 250
    assert 0 < await redis_client.ttl(key) <= 86_400 + 3600


async def test_a_default_budget_applies_to_every_subject_without_its_own(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    await admin.set("user", "*", "tokens", "minute", 100)
    vip = _user()
    await admin.set("user", vip, "tokens", "minute", 10_000)
    budgets = Budgets(redis_client)
    with pytest.raises(BudgetExceeded, match="user-tokens-minute"):
        await budgets.reserve(subjects=[("user", _user())], estimate=Estimate(500, 0))
    assert await budgets.reserve(subjects=[("user", vip)], estimate=Estimate(500, 0)) is not None
    # No budget for apps: nothing to hold.
    assert await budgets.reserve(subjects=[("app", "demo")], estimate=Estimate(500, 0)) is None


async def test_a_reservation_never_settled_lapses_with_its_ttl(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    await admin.set("user", user, "micros", "month", 100)
    budgets = Budgets(redis_client, hold_ttl_s=0.3)
    held = await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 100))
    assert held is not None  # ... and the proxy holding it is killed: never settled
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 1))
    await asyncio.sleep(0.4)
    assert await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 100))
    [state] = await admin.show()
    assert state.used == 0


async def test_reset_forgets_counted_usage(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    await admin.set("user", user, "micros", "day", 100)
    budgets = Budgets(redis_client)
    hold = await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 100))
    assert hold is not None
    await budgets.settle(hold, tokens=0, micros=100)
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 1))
    assert await admin.reset("user", user) >= 1
    assert await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 1))


async def test_unreachable_redis_fails_closed_by_default_or_open_when_told() -> None:
    dead = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    try:
        closed = Budgets(dead)
        with pytest.raises(BudgetUnavailable):
            await closed.reserve(subjects=[("user", "u")], estimate=Estimate(1, 1))
        opened = Budgets(dead, failure_mode="open")
        assert await opened.reserve(subjects=[("user", "u")], estimate=Estimate(1, 1)) is None
    finally:
        await dead.aclose()


def test_windows_are_numbered_like_the_script() -> None:
    moment = 1_764_633_600.0  # 2025-12-02T00:00:00Z
    assert window_index("minute", moment) == int(moment // 60)
    assert window_index("day", moment) == 20_424
    assert window_index("month", moment) == 2025 * 12 + 11


async def test_a_voice_hold_is_topped_up_per_tick_and_runs_short_at_the_limit(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    await admin.set("user", user, "seconds", "day", 10)
    budgets = Budgets(redis_client)
    subjects = [("user", user)]
    live = Metered(micros=0, seconds=0)
    ahead = Metered(micros=0, seconds=4)

    async def tick(hold: str, seconds: int, event: str) -> VoiceCharge | None:
        return await budgets.voice(
            hold_id=hold,
            subjects=subjects,
            mode="tick",
            used=Metered(micros=0, seconds=seconds),
            ahead=ahead,
            event_id=event,
        )

    await budgets.voice(hold_id="a", subjects=subjects, mode="open", used=live, ahead=ahead)
    await budgets.voice(hold_id="b", subjects=subjects, mode="open", used=live, ahead=ahead)
    # 8 of 10 held: a third session does not find its 4 seconds, nothing is held for it.
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.voice(hold_id="c", subjects=subjects, mode="open", used=live, ahead=ahead)
    assert refused.value.name == "user-seconds-day"
    assert refused.value.remaining == 2
    assert refused.value.headers()["RateLimit-Policy"] == '"budget-user-seconds-day";q=10;w=86400'
    # a used 1: holds 4 again (1 + 4 + 4 of 10). b used 2: only 3 left for its hold: short.
    assert await tick("a", 1, "e1") == VoiceCharge(0.9, "user-seconds-day", None)
    assert await tick("b", 2, "e2") == VoiceCharge(1.0, "user-seconds-day", "user-seconds-day")
    # The same event again (a replica replaying its outbox) is not counted twice.
    await tick("b", 2, "e2")
    [state] = await admin.show()
    assert (state.used, state.held) == (3, 7)
    await budgets.voice(hold_id="b", subjects=subjects, mode="release", used=live)
    [state] = await admin.show()
    assert (state.used, state.held) == (3, 4)
    # HTTP calls bill no seconds: a seconds budget never refuses them.
    held = await budgets.reserve(subjects=subjects, estimate=Estimate(10**6, 10**6))
    assert held is None
    # A Realtime call bills no seconds either: it holds nothing in a seconds budget.
    realtime = Metered(tokens=0, micros=0)
    opened = await budgets.voice(
        hold_id="r", subjects=subjects, mode="open", used=realtime, ahead=Metered(100, 100)
    )
    assert opened is None


async def test_voice_and_http_holds_on_one_budget_share_its_running_sum(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    """Both kinds of hold keep `:held:sum` with the sorted set, so each sees the other's."""
    user = _user()
    await admin.set("user", user, "micros", "day", 1000)
    budgets = Budgets(redis_client)
    subjects = [("user", user)]
    base = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    ahead = Metered(micros=600, seconds=0)
    await budgets.voice(
        hold_id="v", subjects=subjects, mode="open", used=Metered(0, 0), ahead=ahead
    )
    assert int(await redis_client.get(f"{base}:held:sum")) == 600
    # The voice hold counts for HTTP: 600 + 500 would pass 1000.
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(subjects=subjects, estimate=Estimate(tokens=1, micros=500))
    http = await budgets.reserve(subjects=subjects, estimate=Estimate(tokens=1, micros=300))
    assert http is not None
    assert int(await redis_client.get(f"{base}:held:sum")) == 900
    # The HTTP hold counts for voice: the tick can top up only to what is left.
    charge = await budgets.voice(
        hold_id="v",
        subjects=subjects,
        mode="tick",
        used=Metered(micros=200),
        ahead=ahead,
        event_id=uuid.uuid4().hex,
    )
    assert charge is not None
    assert charge.short == "user-micros-day"
    await budgets.voice(hold_id="v", subjects=subjects, mode="release", used=Metered(0, 0))
    await budgets.settle(http, tokens=1, micros=100)
    assert await redis_client.get(f"{base}:held:sum") is None
    assert await redis_client.zcard(f"{base}:held") == 0
    assert int(await redis_client.get(base)) == 300


async def test_budgets_written_without_the_index_are_still_enforced(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    # As an older writer (or a hand-made HSET) leaves it: no `_index` field.
    await redis_client.hset(CONFIG_KEY, f"user:{user}:tokens:day", 10)
    budgets = Budgets(redis_client)
    with pytest.raises(BudgetExceeded, match="user-tokens-day"):
        await budgets.reserve(subjects=[("user", user)], estimate=Estimate(11, 0))
    await admin.set("app", "shop", "micros", "day", 5)  # writes the index: both combos
    assert await redis_client.hget(CONFIG_KEY, INDEX_FIELD) == b"app:micros:day,user:tokens:day"
    with pytest.raises(BudgetExceeded, match="user-tokens-day"):
        await budgets.reserve(subjects=[("user", user)], estimate=Estimate(11, 0))


def test_what_a_call_without_reported_usage_is_settled_with() -> None:
    from services.proxy.spend import SpendGuard

    hold = Hold("h", (), Estimate(tokens=500, micros=300))
    assert SpendGuard.charge(hold, 200, None, relayed=True) == (500, 300)  # no usage report
    assert SpendGuard.charge(hold, 499, None, relayed=True) == (500, 300)  # client gone
    assert SpendGuard.charge(hold, 502, None, relayed=True) == (500, 300)  # stream broke
    assert SpendGuard.charge(hold, 400, None, relayed=True) == (0, 0)  # the provider refused
    assert SpendGuard.charge(hold, 502, None, relayed=False) == (0, 0)  # never answered
    assert SpendGuard.charge(hold, 200, None, relayed=False) == (0, 0)  # cache hit, demo


def _admission(client: aioredis.Redis, **kwargs: object) -> Admission:
    return Admission(client, service="test", rider=ADMISSION_RIDER, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("pipelined", [False, True])
async def test_the_reservation_rides_in_the_admission_round_trip(
    redis_client: aioredis.Redis, admin: BudgetAdmin, pipelined: bool
) -> None:
    user = _user()
    await admin.set("user", user, "micros", "day", 1000)
    admission = _admission(redis_client, pipelined=pipelined)
    budgets = Budgets(redis_client)
    layer = Limit("per-token", _user(), 10, 60.0)
    try:
        claim = budgets.claim(subjects=[("user", user)], estimate=Estimate(5, 600))
        decision = await admission.check(
            limits=[layer], client_ip="192.0.2.7", nonce=_user(), nonce_ttl_s=5, rider=claim.rider
        )
        assert decision.allowed
        assert decision.remaining == 9
        hold = budgets.held(claim, decision)
        assert hold is not None
        assert hold.id == claim.id
        [state] = await admin.show()
        assert state.held == 600
        # The budget refuses: no layer consumed, no nonce burnt, nothing held.
        nonce = _user()
        claim = budgets.claim(subjects=[("user", user)], estimate=Estimate(5, 600))
        refused = await admission.check(
            limits=[layer], client_ip="192.0.2.7", nonce=nonce, nonce_ttl_s=5, rider=claim.rider
        )
        assert not refused.allowed
        assert refused.rider_refused
        with pytest.raises(BudgetExceeded, match="user-micros-day") as exceeded:
            budgets.held(claim, refused)
        assert exceeded.value.remaining == 400
        assert not await redis_client.exists(nonce_key(nonce))
        again = await admission.check(limits=[layer], client_ip="192.0.2.7")
        assert again.remaining == 8  # the refused call took no cell
        # A rate layer refuses: the budget is not touched.
        full = Limit("per-token", _user(), 1, 60.0)
        assert (await admission.check(limits=[full], client_ip="192.0.2.7")).allowed
        claim = budgets.claim(subjects=[("user", user)], estimate=Estimate(5, 100))
        limited = await admission.check(limits=[full], client_ip="192.0.2.7", rider=claim.rider)
        assert not limited.allowed
        assert not limited.rider_refused
        assert limited.rider is None
        [state] = await admin.show()
        assert state.held == 600
        # Settled in a batch off the caller's path.
        budgets.settle_soon(hold, tokens=5, micros=250)
        await budgets.flush()
        [state] = await admin.show()
        assert (state.used, state.held) == (250, 0)
    finally:
        await admission.aclose()


async def test_no_budget_configured_rides_along_for_nothing(redis_client: aioredis.Redis) -> None:
    await redis_client.delete(CONFIG_KEY)
    admission = _admission(redis_client)
    budgets = Budgets(redis_client)
    claim = budgets.claim(subjects=[("user", _user())], estimate=Estimate(5, 5))
    layer = Limit("per-ip", _user(), 3, 60.0)
    decision = await admission.check(limits=[layer], client_ip="192.0.2.8", rider=claim.rider)
    assert decision.allowed
    assert decision.rider == ()
    assert budgets.held(claim, decision) is None
    assert await redis_client.exists(rate_key("per-ip", layer.subject))


async def test_many_holds_settle_in_one_batch(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    await admin.set("user", user, "tokens", "minute", 10_000)
    await admin.set("global", "all", "micros", "day", 10**12)
    budgets = Budgets(redis_client, pipelined=True)
    subjects = [("user", user), ("global", "all")]
    try:
        holds = [
            await budgets.reserve(subjects=subjects, estimate=Estimate(100, 10)) for _ in range(40)
        ]
        for i, hold in enumerate(holds):
            assert hold is not None
            budgets.settle_soon(hold, tokens=i, micros=1)
        await budgets.flush()
    finally:
        await budgets.aclose()
    states = {s.scope: s for s in await admin.show() if s.subject in (user, "all")}
    assert (states["user"].used, states["user"].held) == (sum(range(40)), 0)
    assert states["global"].held == 0


async def test_the_rider_follows_the_budget_failure_mode_when_redis_is_away() -> None:
    dead = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    layer = Limit("per-token", "t", 10, 60.0)
    try:
        admission = _admission(dead, failure_modes={"per-token": FailureMode.local})
        for mode in ("closed", "open"):
            budgets = Budgets(dead, failure_mode=mode)  # type: ignore[arg-type]
            claim = budgets.claim(subjects=[("user", "u")], estimate=Estimate(1, 1))
            decision = await admission.check(
                limits=[layer], client_ip="192.0.2.9", rider=claim.rider
            )
            assert decision.allowed
            assert decision.fallback
            assert decision.rider is None
            if mode == "closed":
                with pytest.raises(BudgetUnavailable):
                    budgets.held(claim, decision)
            else:
                assert budgets.held(claim, decision) is None
        # Layers closed (the default): the admission refuses first, the budget is not asked.
        closed = _admission(dead)
        claim = Budgets(dead).claim(subjects=[("user", "u")], estimate=Estimate(1, 1))
        decision = await closed.check(limits=[layer], client_ip="192.0.2.9", rider=claim.rider)
        assert not decision.allowed
        assert decision.fallback
    finally:
        await dead.aclose()


async def test_a_lapsed_hold_settled_late_is_not_subtracted_twice(
    redis_client: aioredis.Redis, admin: BudgetAdmin
) -> None:
    user = _user()
    await admin.set("user", user, "micros", "day", 100)
    budgets = Budgets(redis_client, hold_ttl_s=0.3)
    late = await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 80))
    assert late is not None
    await asyncio.sleep(0.4)
    # 80 lapsed + 60 would not fit: the lapsed hold is dropped, and 60 is held.
    fresh = await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 60))
    assert fresh is not None
    await budgets.settle(late, tokens=0, micros=30)  # the slow call ends after all
    key = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    assert int(await redis_client.get(f"{key}:held:sum") or 0) == 60
    [state] = await admin.show()
    assert (state.used, state.held) == (30, 60)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(subjects=[("user", user)], estimate=Estimate(0, 11))
    assert refused.value.remaining == 10
    await budgets.settle(fresh, tokens=0, micros=0)
    assert not await redis_client.exists(f"{key}:held:sum")
