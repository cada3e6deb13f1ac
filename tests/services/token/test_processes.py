"""Token services as real processes: one shared limit across replicas, and a Redis outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyveil.servers import ServerProcess, start_redis
from tests.services.token.conftest import ORIGIN, browser, fresh_ip
from tests.support import TEST_PROXY_SIGNING_KEY, FakeUpstream, ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SECURE = "/api/voice-agent/secure-token"
LIMIT = 7


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_redis(tmp_path_factory.mktemp("token-redis"), name="token-redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    private_nats: ServerProcess,
    private_redis: ServerProcess,
    fake_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServiceProcess]]:
    logs = tmp_path_factory.mktemp("token-replicas")
    env = {
        "NATS_URL": private_nats.url,
        "REDIS_URL": private_redis.url,
        "REDIS_TIMEOUT_S": "0.3",
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "OPENAI_BASE_URL": fake_upstream.base_url,
        "ALLOWED_ORIGINS": ORIGIN,
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "VOICE_AGENT_RATE_LIMIT": str(LIMIT),
        "RATE_LIMIT_BLOCK_AFTER_STRIKES": "1000",
        "NATS_REQUEST_TIMEOUT_S": "0.5",
    }
    processes = [
        ServiceProcess("token", env, Path(logs) / f"token-{i}.log").start(wait_ready=False)
        for i in range(3)
    ]
    try:
        for process in processes:
            process.wait_ready(timeout=60)
        yield processes
    finally:
        for process in processes:
            process.stop()


async def test_three_replicas_enforce_one_limit(replicas: list[ServiceProcess]) -> None:
    ip = fresh_ip()

    async def ask(client: httpx.AsyncClient, n: int) -> httpx.Response:
        url = f"{replicas[n % 3].url}{SECURE}"
        return await client.post(url, json={"mode": "proxy"}, headers=browser(ip))

    async with httpx.AsyncClient(timeout=10) as client:
        answers = await asyncio.gather(*(ask(client, n) for n in range(60)))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == 60 - LIMIT


async def test_redis_outage_fails_closed_fast_and_recovers(
    replicas: list[ServiceProcess], private_redis: ServerProcess
) -> None:
    url = f"{replicas[0].url}{SECURE}"
    async with httpx.AsyncClient(timeout=10) as client:
        ok = await client.post(url, json={"mode": "proxy"}, headers=browser())
        assert ok.status_code == 200
        private_redis.kill()
        try:
            for _ in range(3):
                started = time.monotonic()
                down = await client.post(url, json={"mode": "proxy"}, headers=browser())
                assert time.monotonic() - started < 2.0
                assert down.status_code == 503
                assert down.json()["error"]["code"] == "security_unavailable"
                assert down.headers["retry-after"] == "1"
                assert "token" not in down.json()
            ready = await client.get(f"{replicas[0].url}/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["redis"] is False
        finally:
            private_redis.start()
        deadline = time.monotonic() + 15
        back: httpx.Response | None = None
        while time.monotonic() < deadline:
            back = await client.post(url, json={"mode": "proxy"}, headers=browser())
            if back.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert back is not None
        assert back.status_code == 200, back.text
        metrics = (await client.get(f"{replicas[0].url}/metrics")).text
    assert 'keyveil_ratelimit_backend_errors_total{service="token"}' in metrics
    assert 'keyveil_token_issued_total{mode="auto",result="error"}' in metrics
    assert "rate limiting backend unreachable" in replicas[0].log()
