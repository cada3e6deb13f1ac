"""The budget burn gauge, read from a real Valkey."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from keyveil.servers import free_port
from services.proxy.burn import BURN, BurnReporter
from shared.budgets import CONFIG_KEY, BudgetAdmin, Budgets, Estimate
from shared.ratelimit import redis_client as make_client


def _burn(scope: str, unit: str, window: str) -> float | None:
    return REGISTRY.get_sample_value(
        "keyveil_budget_burn_ratio", {"scope": scope, "unit": unit, "window": window}
    )


async def test_the_gauge_shows_the_fullest_budget_of_each_kind_and_drops_removed_ones(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.delete(CONFIG_KEY)
    admin = BudgetAdmin(redis_client)
    full, light = uuid.uuid4().hex, uuid.uuid4().hex
    await admin.set("user", full, "micros", "day", 1000)
    await admin.set("user", light, "micros", "day", 1000)
    await admin.set("user", "*", "tokens", "minute", 10)  # a default: not read
    budgets = Budgets(redis_client)
    held = await budgets.reserve(subjects=[("user", full)], estimate=Estimate(0, 600))
    assert held is not None
    await budgets.settle(held, tokens=0, micros=450)
    await budgets.reserve(subjects=[("user", full)], estimate=Estimate(0, 300))
    await budgets.reserve(subjects=[("user", light)], estimate=Estimate(0, 100))
    reporter = BurnReporter(admin, interval_s=60)
    await reporter.report()
    assert _burn("user", "micros", "day") == 0.75  # 450 committed + 300 held of 1000
    assert _burn("user", "tokens", "minute") is None
    await admin.remove("user", full, "micros", "day")
    await admin.remove("user", light, "micros", "day")
    await reporter.report()
    assert _burn("user", "micros", "day") is None
    await redis_client.delete(CONFIG_KEY)


async def test_redis_away_keeps_the_last_reading() -> None:
    admin = BudgetAdmin(make_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2))
    BURN.labels("app", "micros", "month").set(0.5)
    reporter = BurnReporter(admin, interval_s=60)
    await reporter.report()  # logs, does not raise, and forgets nothing
    assert _burn("app", "micros", "month") == 0.5
    BURN.remove("app", "micros", "month")
