"""A live voice session against a money budget: charged every sideband tick, warned at
90 %, ended at 100 % (a real proxy with KEYVEIL_BUDGETS, the fake's real sideband)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess
from shared.budgets import CONFIG_KEY, BudgetAdmin, counter_key, window_index
from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices
from shared.voicesessions import VoiceRegistry
from tests.support import FakeUpstream, ServiceProcess

from .conftest import Browser, proxy_env
from .voicekit import Peer, fake_session, open_live, peer, until, usage_of, voice_fake

pytestmark = pytest.mark.slow

__all__ = ["peer", "voice_fake"]  # fixtures

PRICES = load_prices(DEFAULT_PRICES_FILE)


@pytest.fixture
def budget_proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path: Path,
) -> Iterator[ServiceProcess]:
    env = proxy_env(proxy_nats.url, redis_url, fake_upstream, KEYVEIL_BUDGETS="true")
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start()
    yield service
    service.stop()


@pytest.fixture
async def admin(redis_client: aioredis.Redis) -> AsyncIterator[BudgetAdmin]:
    await redis_client.delete(CONFIG_KEY)
    yield BudgetAdmin(redis_client)
    await redis_client.delete(CONFIG_KEY)


async def test_a_live_session_is_warned_at_90_percent_and_ended_at_100(
    budget_proxy: ServiceProcess,
    voice_fake: FakeUpstream,
    peer: Peer,
    bus: NATS,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    # gpt-live-1 at $0.001 a second; the fake bills 1 s per 100 ms tick: 1000 µ$ a tick.
    per_second = PRICES.cost("gpt-live-1", Usage(seconds=1))
    assert per_second == 1000
    await admin.set("token", "*", "micros", "day", 3_300)
    browser = Browser(budget_proxy.url)
    try:
        session_id, token = await open_live(
            browser, peer, {"model": "gpt-live-1", "audio": {"output": {"voice": "cedar"}}}
        )
    finally:
        await browser.close()
    registry = VoiceRegistry(redis_client)

    async def closed() -> Any:
        record = await registry.get(session_id)
        return record if record is not None and record.status == "closed" else None

    record = await until(closed, "the session over its budget is still open", timeout=10)
    assert record.closed_reason == "budget_exceeded"
    assert fake_session(voice_fake, session_id)["state"] == "closed"

    async def metered() -> list[dict[str, Any]]:
        events = await usage_of(bus, session_id)
        billed = [e for e in events if e["type"] == "voice.usage"]
        return (
            events if billed and max(e["seconds_total"] for e in billed) >= record.billed_s else []
        )

    events = await until(metered, "the usage never reached JetStream")
    billed = [e for e in events if e["type"] == "voice.usage"]
    warnings = [e for e in events if e["type"] == "voice.budget.warning"]
    spent = sum(e["cost_micros"] for e in billed)
    assert spent == PRICES.cost("gpt-live-1", Usage(seconds=record.billed_s))
    # Ended at the first tick that reached the limit: never a whole tick beyond it.
    assert 3_300 <= spent < 3_300 + 2 * per_second
    assert len(warnings) == 1
    assert warnings[0]["reason"] == {"kind": "budget_warning", "budget": "token-micros-day"}
    assert warnings[0]["token_id"] == token.claims.jti
    # Counted against this token's own counter under the default ('*') budget.
    key = counter_key("token", token.claims.jti, "micros", "day", window_index("day", time.time()))
    assert int(await redis_client.get(key) or 0) == spent
