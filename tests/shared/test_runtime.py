"""The service runtime on a real NATS and Redis: a failed start leaves nothing open, stop
drains in the documented order, and the edges' leases follow the shared settings."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from keyveil.servers import ServerProcess, start_nats
from services.proxy.app import create_app as proxy_app
from services.proxy.settings import Settings as ProxySettings
from services.token.settings import Settings as TokenSettings
from shared.errors import UnavailableError
from shared.events import UsageEvent
from shared.leases import LEASE_SUBJECT, LeaseRequest
from shared.runtime import ServiceRuntime
from shared.settings import CommonSettings, EdgeSettings, load_settings
from shared.streams import EDGE_STREAMS
from tests.support import TEST_PROXY_SIGNING_KEY, until


@pytest.fixture(scope="module")
def private_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A NATS of these tests' own: no key manager answers leases on it."""
    server = start_nats(tmp_path_factory.mktemp("runtime-nats"), streams=True)
    yield server
    server.stop()


@pytest.fixture
async def silent_key_manager(private_nats: ServerProcess) -> AsyncIterator[list[LeaseRequest]]:
    """Hears every lease request on the private bus and never answers one."""
    client = await nats.connect(private_nats.url)
    seen: list[LeaseRequest] = []

    async def hear(msg: Msg) -> None:
        seen.append(LeaseRequest.model_validate_json(msg.data))

    await client.subscribe(LEASE_SUBJECT, cb=hear)
    await client.flush()
    yield seen
    await client.drain()


def _runtime(nats_url: str, redis_url: str) -> ServiceRuntime:
    settings = load_settings(CommonSettings, NATS_URL=nats_url)
    return ServiceRuntime(
        settings,
        service="token",
        streams=EDGE_STREAMS,
        redis_url=redis_url,
        lease_environment="development",
    )


async def _clients_named(redis: aioredis.Redis, name: str) -> int:
    return sum(1 for client in await redis.client_list() if client.get("name") == name)


async def _readiness(runtime: ServiceRuntime) -> dict[str, bool]:
    return {name: await check() for name, check in runtime.checks.items()}


async def test_a_step_that_raises_leaves_no_connection_client_or_task_open(
    private_nats: ServerProcess, redis_url: str, redis_client: aioredis.Redis
) -> None:
    before = asyncio.all_tasks()
    runtime = _runtime(private_nats.url, redis_url)
    name = f"runtime-probe-{uuid.uuid4().hex[:12]}"
    opened: dict[str, NATS] = {}

    async def forever() -> None:
        await asyncio.Event().wait()  # ignores `stopping`: stop must cancel it

    async def build() -> None:
        await runtime.redis.client_setname(name)
        await runtime.redis_client(redis_url).client_setname(name)
        opened["nc"] = runtime.nc
        runtime.spawn(forever(), name="runtime-probe-task", drain=False)
        assert await _clients_named(redis_client, name) == 2
        assert runtime.nc.is_connected
        raise RuntimeError("a later step failed")

    with pytest.raises(RuntimeError, match="a later step failed"):
        await runtime.start(build)

    assert opened["nc"].is_closed
    await until(_no_clients(redis_client, name))
    await until(lambda: not {t for t in asyncio.all_tasks() - before if not t.done()})
    assert await _readiness(runtime) == {"nats": False, "redis": False, "streams": False}
    await runtime.stop()  # a failed start is already closed: stop is a no-op


def _no_clients(redis: aioredis.Redis, name: str) -> Callable[[], Any]:
    async def check() -> bool:
        return await _clients_named(redis, name) == 0

    return check


async def test_stop_drains_in_the_documented_order(
    private_nats: ServerProcess, redis_url: str
) -> None:
    runtime = _runtime(private_nats.url, redis_url)
    order: list[tuple[str, bool]] = []
    event = UsageEvent(service="token", type="token.issued")
    listener = await nats.connect(private_nats.url)
    published = await listener.subscribe(event.subject)
    await listener.flush()

    def step(name: str) -> None:
        order.append((name, runtime.nc.is_connected))

    async def in_flight() -> None:
        await runtime.stopping.wait()
        step("task")

    async def drain() -> None:
        step("drain")
        # Emitted while draining, still published: the publisher flushes after the drain.
        runtime.publisher.emit(event)

    async def resource_closed() -> None:
        step("resource")

    async def build() -> None:
        runtime.spawn(in_flight(), name="in-flight")
        runtime.stack.push_async_callback(resource_closed)
        runtime.on_drain(drain)
        runtime.on_stop(lambda: step("stop accepting"))

    assert await _readiness(runtime) == {"nats": False, "redis": False, "streams": False}
    await runtime.start(build)
    try:
        assert await _readiness(runtime) == {"nats": True, "redis": True, "streams": True}
    finally:
        await runtime.stop()

    assert order == [("stop accepting", True), ("drain", True), ("task", True), ("resource", True)]
    msg = await published.next_msg(timeout=5)
    assert UsageEvent.model_validate_json(msg.data).event_id == event.event_id
    assert runtime.nc.is_closed
    assert await _readiness(runtime) == {"nats": False, "redis": False, "streams": False}
    await listener.drain()


_EDGES: dict[str, type[EdgeSettings]] = {"token": TokenSettings, "proxy": ProxySettings}
E = TypeVar("E", bound=EdgeSettings)


def _staging_edge(model: type[E], nats_url: str, redis_url: str) -> E:
    """An edge in development that leases staging's key, waiting 0.3 s for a lease."""
    return load_settings(
        model,
        NATS_URL=nats_url,
        REDIS_URL=redis_url,
        PROXY_SIGNING_KEY=TEST_PROXY_SIGNING_KEY,
        NODE_ENV="development",
        KEY_ENVIRONMENT="staging",
        NATS_REQUEST_TIMEOUT_S=0.3,
    )


@pytest.mark.parametrize("service", sorted(_EDGES))
async def test_edge_leases_follow_key_environment_and_the_request_timeout(
    service: str,
    private_nats: ServerProcess,
    redis_url: str,
    silent_key_manager: list[LeaseRequest],
) -> None:
    """KEY_ENVIRONMENT reached only the proxy once; NATS_REQUEST_TIMEOUT_S the token only."""
    settings = _staging_edge(_EDGES[service], private_nats.url, redis_url)
    runtime = ServiceRuntime.for_edge(settings, service=service)

    async def nothing() -> None:
        return None

    await runtime.start(nothing)
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await runtime.leases.lease()
        waited = time.monotonic() - started
    finally:
        await runtime.stop()
    assert [(r.requester, r.environment) for r in silent_key_manager] == [(service, "staging")]
    assert 0.25 <= waited < 1.5  # the lease client's own default is 2 s


async def test_the_proxy_app_leases_for_key_environment(
    private_nats: ServerProcess,
    redis_url: str,
    silent_key_manager: list[LeaseRequest],
) -> None:
    """The wiring, not just the runtime: the started proxy warms its lease for staging."""
    app = proxy_app(_staging_edge(ProxySettings, private_nats.url, redis_url))
    async with app.router.lifespan_context(app):
        await until(lambda: silent_key_manager)
    # Unanswered, the warm-up asks again after its timeout: every ask is for staging.
    assert {(r.requester, r.environment) for r in silent_key_manager} == {("proxy", "staging")}
