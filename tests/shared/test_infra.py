"""The harness itself: real servers answer, and the fake upstream records keys."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.support import FakeUpstream


async def test_nats_has_jetstream(nc: NATS) -> None:
    info = await nc.jetstream().account_info()
    assert info.limits is not None


async def test_redis_answers(redis_client: aioredis.Redis) -> None:
    assert await redis_client.ping() is True


def test_fake_upstream_records_the_key_it_received(fake_upstream: FakeUpstream) -> None:
    fake_upstream.clear()
    answer = httpx.post(
        f"{fake_upstream.base_url}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": []},
        headers={"Authorization": "Bearer sk-recorded"},
    )
    assert answer.status_code == 200
    assert fake_upstream.calls()[-1]["authorization"] == "Bearer sk-recorded"
