"""Token service fixtures: a private NATS with the real key-manager, and the app in process."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from keyveil.servers import ServerProcess, start_nats
from services.token.app import create_app
from services.token.settings import Settings
from shared.settings import load_settings
from tests.support import (
    TEST_PROXY_SIGNING_KEY,
    FakeUpstream,
    ServiceProcess,
    key_manager_process,
)

ORIGIN = "https://app.example.test"


@pytest.fixture(scope="module")
def private_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_nats(tmp_path_factory.mktemp("token-nats"), streams=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def bus(private_nats: ServerProcess) -> AsyncIterator[NATS]:
    client = await nats.connect(private_nats.url)
    yield client
    await client.drain()


@pytest.fixture(scope="module")
def key_manager(
    private_nats: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """The real key-manager process, bootstrapped with the test provider key."""
    process = key_manager_process(private_nats.url, tmp_path_factory.mktemp("token-km"))
    process.start()
    yield process
    process.stop()


def token_settings(*, nats_url: str, redis_url: str, upstream: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "NATS_URL": nats_url,
        "REDIS_URL": redis_url,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "OPENAI_BASE_URL": upstream,
        "ALLOWED_ORIGINS": f"{ORIGIN},http://localhost:3000",
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "VOICE_AGENT_RATE_LIMIT": 1000,
        "VOICE_AGENT_TOKEN_DURATION": 120,
        "PROXY_PUBLIC_URL": "https://proxy.example.test/api/voice-agent/proxy/v1",
        "NATS_REQUEST_TIMEOUT_S": 1.0,
    }
    values.update(overrides)
    return load_settings(Settings, **values)


AppFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def token_app(
    private_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
) -> AppFactory:
    """`async with token_app(**settings) as client:` runs the app's lifespan in process."""

    @asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = token_settings(
            nats_url=private_nats.url,
            redis_url=redis_url,
            upstream=fake_upstream.base_url,
            **overrides,
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://token.test") as c:
                yield c

    return run


def fresh_ip() -> str:
    """A client address no other test has used, passed as X-Forwarded-For."""
    n = uuid.uuid4().int
    return f"10.{n % 250}.{(n >> 8) % 250}.{(n >> 16) % 250 + 1}"


def browser(ip: str | None = None, origin: str | None = ORIGIN) -> dict[str, str]:
    headers = {"X-Forwarded-For": ip or fresh_ip()}
    if origin is not None:
        headers["Origin"] = origin
    return headers


class EventLog:
    """Every event the app publishes on the private bus, as plain dicts."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def on(self, msg: Msg) -> None:
        self.events.append(json.loads(msg.data))

    async def wait_for(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if all(event.get(k) == v for k, v in match.items()):
                    return event
            await asyncio.sleep(0.02)
        raise AssertionError(f"no event matching {match}; saw {self.events[-5:]}")


@pytest.fixture
async def events(bus: NATS) -> AsyncIterator[EventLog]:
    log = EventLog()
    sub = await bus.subscribe("keyveil.>", cb=log.on)
    await bus.flush()
    yield log
    await sub.unsubscribe()
