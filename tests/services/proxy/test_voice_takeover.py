"""kill -9 of the proxy holding a sideband: another proxy re-attaches within 10 s, and
every billable second is still counted exactly once on JetStream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess
from shared.tokens import revoked_key
from shared.voicesessions import VoiceRegistry
from tests.support import TEST_PROVIDER_KEY, FakeUpstream, ServiceProcess

from .conftest import Browser, proxy_env
from .voicekit import Peer, fake_session, open_live, peer, until, usage_of

pytestmark = pytest.mark.slow

__all__ = ["peer"]  # fixture


@pytest.fixture
def replicas(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path: Path,
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    env = proxy_env(proxy_nats.url, redis_url, fake_upstream, VOICE_SIDEBAND_LEASE_MS="3000")
    first = ServiceProcess("proxy", env, tmp_path / "proxy-a.log")
    second = ServiceProcess("proxy", env, tmp_path / "proxy-b.log")
    first.start(wait_ready=False)
    second.start(wait_ready=False)
    first.wait_ready()
    second.wait_ready()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
async def browser_a(replicas: tuple[ServiceProcess, ServiceProcess]) -> AsyncIterator[Browser]:
    client = Browser(replicas[0].url)
    yield client
    await client.close()


async def test_kill_9_of_the_sideband_owner_is_taken_over_without_losing_usage(
    replicas: tuple[ServiceProcess, ServiceProcess],
    browser_a: Browser,
    upstream: FakeUpstream,
    peer: Peer,
    bus: NATS,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(voice_tick_ms=100)
    first, _ = replicas
    assert first.process is not None
    session_id, token = await open_live(browser_a, peer)
    registry = VoiceRegistry(redis_client)
    owner = await registry.owner(session_id)
    assert owner is not None
    assert f":{first.process.pid}:" in owner
    await until(lambda: fake_session(upstream, session_id)["sidebands"] == 1, "no sideband")

    async def some_usage() -> bool:
        return len(await usage_of(bus, session_id)) >= 3

    await until(some_usage, "no usage before the kill")

    first.kill()  # SIGKILL: no shutdown, no lease released
    killed_at = time.monotonic()

    def reattached() -> bool:
        state = fake_session(upstream, session_id)
        return bool(state["sideband_connects"] >= 2 and state["sidebands"] >= 1)

    await until(reattached, "no replica re-attached the sideband", timeout=10.0)
    took = time.monotonic() - killed_at
    assert took < 10.0
    new_owner = await registry.owner(session_id)
    assert new_owner is not None
    assert f":{first.process.pid}:" not in new_owner
    seconds_at_takeover = fake_session(upstream, session_id)["seconds"]

    async def billed_past_takeover() -> bool:
        events = await usage_of(bus, session_id)
        return max(e["seconds_total"] for e in events) > seconds_at_takeover

    await until(billed_past_takeover, "the new owner reports no usage")

    # The new owner still ends the session on revocation.
    await redis_client.set(revoked_key(token.claims.jti), "1", ex=60)
    await until(
        lambda: fake_session(upstream, session_id)["state"] == "closed",
        "the session outlived its token after the takeover",
        timeout=2.5,
    )
    final = fake_session(upstream, session_id)["seconds"]

    async def all_billed() -> list[dict[str, object]]:
        events = await usage_of(bus, session_id)
        return events if max(float(str(e["seconds_total"])) for e in events) >= final else []

    events = await until(all_billed, "the final usage never reached JetStream")
    # Nothing lost, nothing twice: the deltas add up to the provider's final count.
    assert sum(float(str(e["seconds"])) for e in events) == pytest.approx(final)
    assert len({e["event_id"] for e in events}) == len(events)
    record = await registry.get(session_id)
    assert record is not None
    assert record.status == "closed"
    assert record.attachments >= 2
    assert record.billed_s == final
    assert TEST_PROVIDER_KEY not in record.model_dump_json()
    print(f"takeover after kill -9: {took:.2f} s")


async def test_a_replica_stopping_hands_its_sidebands_over_at_once(
    replicas: tuple[ServiceProcess, ServiceProcess],
    browser_a: Browser,
    upstream: FakeUpstream,
    peer: Peer,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(voice_tick_ms=100)
    first, _ = replicas
    session_id, _ = await open_live(browser_a, peer)
    await until(lambda: fake_session(upstream, session_id)["sidebands"] == 1, "no sideband")
    stopping = time.monotonic()
    first.stop()  # SIGTERM: the session is let go (its lease released), not ended
    await until(
        lambda: fake_session(upstream, session_id)["sideband_connects"] >= 2,
        "nobody took the session over",
        timeout=5.0,
    )
    took = time.monotonic() - stopping
    assert fake_session(upstream, session_id)["state"] == "open"
    record = await VoiceRegistry(redis_client).get(session_id)
    assert record is not None
    assert record.status == "live"
    # Released, not expired: far sooner than the 3 s lease.
    print(f"hand-over after SIGTERM: {took:.2f} s")
    assert took < 3.0
    httpx.post(f"{upstream.url}/_fake/sessions/{session_id}/close", json={"reason": "expired"})
