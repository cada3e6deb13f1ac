"""Session fixtures: a real nats-server (JetStream) and a real Redis-compatible server.

Set KEYVEIL_TEST_NATS_URL / KEYVEIL_TEST_REDIS_URL to use servers you already run.
Tests that kill a server start their own with `keyveil.servers.start_nats/start_redis`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, start_nats, start_redis
from tests.support import FakeUpstream, start_fake_upstream


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def nats_url(infra_dir: Path) -> Iterator[str]:
    given = os.environ.get("KEYVEIL_TEST_NATS_URL")
    if given:
        yield given
        return
    server: ServerProcess = start_nats(infra_dir)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_url(infra_dir: Path) -> Iterator[str]:
    given = os.environ.get("KEYVEIL_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = start_redis(infra_dir)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def fake_upstream(infra_dir: Path) -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(infra_dir)
    yield fake
    fake.server.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()
