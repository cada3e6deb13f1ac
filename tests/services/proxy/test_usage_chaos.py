"""Usage events under kill -9: a proxy with its event outbox, real NATS (JetStream), real
Valkey and the fake provider, all processes of this module's own.

The property, for every victim (the proxy, nats-server, Valkey): each request the client
saw answered 2xx has its usage event in the stream, and all copies of it carry one event
id. Every request uses a token of its own, so the event is found by its token id.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from keyveil.servers import ServerProcess, start_nats, start_redis
from tests.stack import read_stream
from tests.support import FakeUpstream, ServiceProcess, key_manager_process

from .conftest import CHAT, Browser, chat_body, proxy_env

pytestmark = pytest.mark.slow


@dataclass
class Chaos:
    nats: ServerProcess
    redis: ServerProcess
    proxy: ServiceProcess
    outbox: Path

    def revive(self) -> None:
        """Whatever a test killed runs again (the next test starts from a healthy system)."""
        for server in (self.nats, self.redis):
            if server.process is None or server.process.poll() is not None:
                server.start()
        if self.proxy.process is None or self.proxy.process.poll() is not None:
            self.proxy.start()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream) -> Iterator[Chaos]:
    base = tmp_path_factory.mktemp("usage-chaos")
    nats_server = start_nats(base, streams=True)
    redis_server = start_redis(base)
    keymanager = key_manager_process(nats_server.url, base)
    keymanager.start()
    outbox = base / "outbox"
    env = proxy_env(
        nats_server.url,
        redis_server.url,
        fake_upstream,
        PROXY_OUTBOX_DIR=str(outbox),
        VOICE_AGENT_USER_RATE_LIMIT="100000",
    )
    proxy = ServiceProcess("proxy", env, base / "proxy.log")
    proxy.start()
    yield Chaos(nats_server, redis_server, proxy, outbox / "proxy")
    proxy.stop()
    keymanager.stop()
    redis_server.stop()
    nats_server.stop()


@pytest.fixture
def system(chaos: Chaos, fake_upstream: FakeUpstream) -> Iterator[Chaos]:
    fake_upstream.behave()
    chaos.revive()
    yield chaos
    chaos.revive()


def _error_code(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:40]


@dataclass
class Traffic:
    """A few concurrent clients, each request with a fresh token; every answer recorded."""

    browser: Browser
    answers: list[tuple[str, int]] = field(default_factory=list)
    # Every refusal as (status, JSON error code or the body's first bytes when not JSON).
    refusals: list[tuple[int, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def served(self) -> set[str]:
        return {jti for jti, status in self.answers if 200 <= status < 300}

    def served_since(self, mark: int) -> int:
        return sum(1 for _, status in self.answers[mark:] if 200 <= status < 300)

    async def _client(self) -> None:
        while not self.stop.is_set():
            token = self.browser.token()
            try:
                answer = await self.browser.post(CHAT, chat_body(), token)
            except httpx.HTTPError:
                status = 0
            else:
                status = answer.status_code
                if status >= 300:
                    self.refusals.append((status, _error_code(answer)))
            self.answers.append((token.claims.jti, status))
            await asyncio.sleep(0.01)

    async def until(self, served: int, *, since: int = 0, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while self.served_since(since) < served:
            assert time.monotonic() < deadline, f"not serving: {self.answers[-5:]}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def traffic(system: Chaos) -> AsyncIterator[Traffic]:
    browser = Browser(system.proxy.url)
    load = Traffic(browser)
    clients = [asyncio.create_task(load._client()) for _ in range(4)]
    yield load
    load.stop.set()
    await asyncio.gather(*clients)
    await browser.close()


async def _event_ids_by_token(nats_url: str, tokens: set[str]) -> dict[str, set[str]]:
    """Event ids of the proxy's usage events per token id, once every token has one."""
    deadline = time.monotonic() + 60
    while True:
        nc = await nats.connect(nats_url)
        try:
            raw = await read_stream(nc, "keyveil.usage.proxy")
        finally:
            await nc.close()
        found: dict[str, set[str]] = defaultdict(set)
        for data in raw:
            event = orjson.loads(data)
            if event.get("token_id") in tokens:
                found[event["token_id"]].add(event["event_id"])
        if tokens <= found.keys() or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1)


async def _assert_every_served_request_has_one_event(system: Chaos, traffic: Traffic) -> None:
    traffic.stop.set()
    await asyncio.sleep(0.5)  # the clients' last requests finish
    served = traffic.served()
    found = await _event_ids_by_token(system.nats.url, served)
    missing = served - found.keys()
    assert not missing, f"{len(missing)} of {len(served)} served requests have no usage event"
    assert all(len(ids) == 1 for ids in found.values()), "copies of an event with other ids"


async def test_a_proxy_killed_under_traffic_loses_no_usage_event(
    system: Chaos, traffic: Traffic
) -> None:
    await traffic.until(30)
    system.proxy.kill()
    await asyncio.sleep(0.3)
    mark = len(traffic.answers)
    await asyncio.to_thread(system.proxy.start)
    await traffic.until(30, since=mark)
    await _assert_every_served_request_has_one_event(system, traffic)


async def test_a_proxy_killed_with_unpublished_events_replays_them_at_restart(
    system: Chaos, traffic: Traffic
) -> None:
    """NATS away: every event the proxy holds is certainly unpublished when it dies."""
    await traffic.until(10)
    system.nats.kill()
    mark = len(traffic.answers)
    await traffic.until(20, since=mark)  # the lease is cached: served while NATS is away
    traffic.stop.set()
    await asyncio.sleep(0.5)
    assert system.proxy.process is not None
    dead = f"{system.proxy.process.pid}-*.outbox"
    assert list(system.outbox.glob(dead)), "the served events are not in the outbox"
    system.proxy.kill()
    system.nats.start()
    await asyncio.to_thread(system.proxy.start)
    await _assert_every_served_request_has_one_event(system, traffic)
    # Replayed and acknowledged: the dead process's segments are gone.
    deadline = time.monotonic() + 10
    while list(system.outbox.glob(dead)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not list(system.outbox.glob(dead))


async def test_nats_killed_under_traffic_loses_no_usage_event(
    system: Chaos, traffic: Traffic
) -> None:
    await traffic.until(30)
    system.nats.kill()
    await asyncio.sleep(2)
    system.nats.start()  # same port, same JetStream store
    mark = len(traffic.answers)
    await traffic.until(30, since=mark)
    await _assert_every_served_request_has_one_event(system, traffic)


async def test_valkey_killed_under_traffic_loses_no_usage_event(
    system: Chaos, traffic: Traffic
) -> None:
    await traffic.until(30)
    system.redis.kill()
    await asyncio.sleep(1.5)
    refused = [status for _, status in traffic.answers[-8:]]
    system.redis.start()  # same port, same append-only file
    mark = len(traffic.answers)
    await traffic.until(30, since=mark)
    assert any(status == 503 for status in refused), f"Redis away, yet: {refused}"
    # Away and back again: every refusal a 503 with a JSON code, never a 500 (LOADING and
    # the other server-side refusals: tests/shared/test_ratelimit_outages.py).
    assert {status for status, _ in traffic.refusals} == {503}, traffic.refusals
    assert {code for _, code in traffic.refusals} <= {"security_unavailable"}, traffic.refusals
    await _assert_every_served_request_has_one_event(system, traffic)
