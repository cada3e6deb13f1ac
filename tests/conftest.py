"""Session fixtures: a real nats-server (JetStream) and a real Redis-compatible server.

Where they come from, in order: KEYVEIL_TEST_NATS_URL / KEYVEIL_TEST_REDIS_URL (servers
you already run); containers via testcontainers when a Docker engine answers (opt out
with KEYVEIL_TEST_DOCKER=0); else subprocesses from the pip-installed binaries.
Tests that kill a server start their own with `keyveil.servers.start_nats/start_redis`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, bootstrap_nats, start_nats, start_redis
from tests.support import FakeUpstream, start_fake_upstream


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


def _docker_engine() -> bool:
    if os.environ.get("KEYVEIL_TEST_DOCKER") == "0":
        return False
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    import docker

    try:
        client = docker.from_env(timeout=2)
    except Exception:  # no engine configured: use subprocesses
        return False
    try:
        return bool(client.ping())
    except Exception:  # no engine answering, or no permission: use subprocesses
        return False
    finally:
        client.close()


@contextmanager
def _container(image: str, command: str, port: int, ready_log: str) -> Iterator[str]:
    """host:port of a throwaway container (only where a Docker engine runs)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with DockerContainer(image).with_command(command).with_exposed_ports(port) as container:
        wait_for_logs(container, ready_log, timeout=30)
        yield f"{container.get_container_host_ip()}:{container.get_exposed_port(port)}"


@pytest.fixture(scope="session")
def docker_engine() -> bool:
    return _docker_engine()


@pytest.fixture(scope="session")
def nats_url(infra_dir: Path, docker_engine: bool) -> Iterator[str]:
    """A JetStream server with the keyveil streams made, as `keyveil bootstrap` makes them."""
    given = os.environ.get("KEYVEIL_TEST_NATS_URL")
    if given:
        bootstrap_nats(given)
        yield given
    elif docker_engine:
        with _container("nats:2.11-alpine", "-js", 4222, "Server is ready") as address:
            bootstrap_nats(f"nats://{address}")
            yield f"nats://{address}"
    else:
        server: ServerProcess = start_nats(infra_dir)
        bootstrap_nats(server.url)
        yield server.url
        server.stop()


@pytest.fixture(scope="session")
def redis_url(infra_dir: Path, docker_engine: bool) -> Iterator[str]:
    given = os.environ.get("KEYVEIL_TEST_REDIS_URL")
    if given:
        yield given
    elif docker_engine:
        with _container("redis:7-alpine", "redis-server", 6379, "Ready to accept") as address:
            yield f"redis://{address}/0"
    else:
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


@pytest.fixture(autouse=True, scope="module")
def _forget_ip_reputation(redis_url: str) -> None:
    """Every test talks from 127.0.0.1: one module's auth-failure tests must not leave that
    address blocked (kv:block / kv:strikes) for the next module's processes."""
    client = sync_redis.Redis.from_url(redis_url)
    try:
        for pattern in ("kv:block:*", "kv:strikes:*"):
            for key in client.scan_iter(match=pattern):
                client.delete(key)
    finally:
        client.close()
