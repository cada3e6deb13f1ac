"""One service runtime: the composition root every keyveil service starts and stops through.

`start(build)` enters, in this order, on one `AsyncExitStack`:

    Redis (the edges)  ->  NATS  ->  key leases (the edges)  ->  event publisher
    ->  stream guard  ->  whatever the service's `build` adds (its clients, handlers, tasks)

If any step raises, everything entered before it is closed again (connections, clients,
tasks) and the error propagates: a service that cannot start leaves nothing open.

`stop()` drains in this order:

    1. stop accepting: `stopping` is set, `on_stop` callbacks run (unsubscribe, refuse
       new requests, hand voice sessions to another replica)
    2. drain in-flight work: `on_drain` callbacks, then the spawned tasks (bounded by
       `drain_timeout_s`; what is still running then is cancelled)
    3. the service's own resources, last entered first
    4. the stream guard, then the publisher flushes (events emitted while draining still go)
    5. leases, NATS (drained), Redis

The secrets of the settings are registered with the log redactor when the runtime is
made, before anything could log them; the readiness checks ("nats", "redis" on the
edges, "streams", and the service's own through `ready_when`) are all kept here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus
from shared.events import EventPublisher, drift_reporter
from shared.httpedge import ReadinessCheck, add_edge_routes, service_app
from shared.leases import LeaseClient
from shared.ratelimit import redis_client
from shared.settings import CommonSettings, EdgeSettings
from shared.streams import EDGE_STREAMS, StreamGuard
from shared.telemetry import redactor

__all__ = ["Build", "ServiceRuntime", "started"]

log = logging.getLogger(__name__)

Build = Callable[[], Awaitable[None]]
"""What a service adds once the runtime's own parts are open."""
StopCallback = Callable[[], object]
"""Called at stop; may return an awaitable, which is awaited."""
T = TypeVar("T")


class _Closable(Protocol):
    def aclose(self) -> Awaitable[None]: ...


C = TypeVar("C", bound=_Closable)


class ServiceRuntime:
    """The running parts of one service process, opened and closed in one documented order."""

    def __init__(
        self,
        settings: CommonSettings,
        *,
        service: str,
        streams: Sequence[str],
        redis_url: str | None = None,
        redis_timeout_s: float = 0.5,
        lease_environment: str | None = None,
        outbox_dir: Path | None = None,
        max_in_flight: int = 256,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.service = service
        self._streams = tuple(streams)
        self._redis_url = redis_url
        self._redis_timeout_s = redis_timeout_s
        self._lease_environment = lease_environment
        self._outbox_dir = outbox_dir
        self._drain_timeout_s = drain_timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self.stack = AsyncExitStack()
        self.stopping = asyncio.Event()
        self.started = False
        self._used = False
        self._on_stop: list[StopCallback] = []
        self._on_drain: list[StopCallback] = []
        self._drained: set[asyncio.Task[None]] = set()
        self._cancelled: set[asyncio.Task[None]] = set()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._redis: aioredis.Redis | None = None
        self._leases: LeaseClient | None = None
        self._publisher: EventPublisher | None = None
        self._guard: StreamGuard | None = None
        self.checks: dict[str, ReadinessCheck] = {"nats": self._nats_ready}
        if redis_url is not None:
            self.checks["redis"] = self._redis_ready
        self.checks["streams"] = self._streams_ready
        redactor.register(*settings.secret_values())

    @classmethod
    def for_edge(
        cls,
        settings: EdgeSettings,
        *,
        service: str,
        leases: bool = True,
        outbox_dir: Path | None = None,
    ) -> ServiceRuntime:
        """An HTTP edge's runtime: Redis at REDIS_URL, the edge streams, key leases for
        KEY_ENVIRONMENT (default NODE_ENV) unless `leases` is False."""
        return cls(
            settings,
            service=service,
            streams=EDGE_STREAMS,
            redis_url=settings.redis_url,
            redis_timeout_s=settings.redis_timeout_s,
            lease_environment=settings.lease_environment if leases else None,
            outbox_dir=outbox_dir,
        )

    # -- what a service builds on ------------------------------------------------------

    @property
    def nc(self) -> NATS:
        return started(self._nc)

    @property
    def js(self) -> JetStreamContext:
        """JetStream; its API calls wait NATS_REQUEST_TIMEOUT_S, like every NATS request."""
        return started(self._js)

    @property
    def redis(self) -> aioredis.Redis:
        return started(self._redis)

    @property
    def leases(self) -> LeaseClient:
        return started(self._leases)

    @property
    def publisher(self) -> EventPublisher:
        return started(self._publisher)

    def closing(self, resource: C) -> C:
        """`resource`, closed (`aclose`) at stop with the service's own resources."""
        self.stack.push_async_callback(resource.aclose)
        return resource

    def redis_client(self, url: str) -> aioredis.Redis:
        """A Redis client for `url`, closed at stop (the one place a service makes one)."""
        client: aioredis.Redis = self.closing(redis_client(url, self._redis_timeout_s))
        return client

    def ready_when(self, name: str, check: ReadinessCheck) -> None:
        """Add a readiness check; /readyz answers ready only when every check passes."""
        self.checks[name] = check

    def on_stop(self, callback: StopCallback) -> None:
        """Run `callback` first at stop, to stop accepting new work."""
        self._on_stop.append(callback)

    def on_drain(self, callback: StopCallback) -> None:
        """Run `callback` at stop once nothing new is accepted, to finish in-flight work."""
        self._on_drain.append(callback)

    def spawn(
        self, work: Coroutine[Any, Any, None], *, name: str, drain: bool = True
    ) -> asyncio.Task[None]:
        """Run `work` in the background until stop.

        With `drain`, stop waits for it (it should return once `stopping` is set);
        without, it is a helper that stop cancels while it stops accepting.
        """
        task = asyncio.create_task(work, name=name)
        tasks = self._drained if drain else self._cancelled
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(_report_failure)
        return task

    async def serve(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, queue: str
    ) -> None:
        """Answer `subject` concurrently, at most `max_in_flight` at a time across the
        service; stop unsubscribes first and then waits for the answers in flight."""

        async def answer(msg: Msg) -> None:
            async with self._slots:
                await handler(msg)

        async def spawn(msg: Msg) -> None:
            self.spawn(answer(msg), name=subject)

        subscription = await self.nc.subscribe(subject, queue=queue, cb=spawn)

        async def unsubscribe() -> None:
            with contextlib.suppress(Exception):  # a closed connection has no subscription
                await subscription.unsubscribe()

        self.on_stop(unsubscribe)

    # -- start and stop ----------------------------------------------------------------

    async def start(self, build: Build) -> None:
        """Open the runtime's parts, then `build`; on any failure close all that opened."""
        if self._used:
            raise RuntimeError(f"the {self.service} runtime starts once")
        self._used = True
        try:
            await self._open()
            await build()
        except BaseException:
            await self._close()
            raise
        self.started = True

    async def stop(self) -> None:
        """Drain and close, in the order in the module docstring; once."""
        if self._used and not self.stopping.is_set():
            await self._close()

    def app(self, title: str, build: Build) -> FastAPI:
        """The service's FastAPI app: the lifespan starts and stops this runtime, and
        /healthz, /readyz (these checks) and /metrics are routed."""

        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await self.start(build)
            try:
                yield
            finally:
                await self.stop()

        app = service_app(title, lifespan)
        add_edge_routes(app, self.checks)
        return app

    async def _open(self) -> None:
        settings = self.settings
        if self._redis_url is not None:
            self._redis = self.redis_client(self._redis_url)
        self._nc = await bus.connect(settings, name=self.service)
        self.stack.push_async_callback(self._drain_bus, self._nc)
        self._js = self._nc.jetstream(timeout=settings.nats_request_timeout_s)
        if self._lease_environment is not None:
            self._leases = LeaseClient(
                self._nc,
                requester=self.service,
                environment=self._lease_environment,
                timeout_s=settings.nats_request_timeout_s,
            )
            await self._leases.start()
            self.stack.push_async_callback(self._leases.stop)
        self._publisher = EventPublisher(self._js, outbox_dir=self._outbox_dir)
        self._publisher.start()
        self.stack.push_async_callback(self._publisher.close)
        self._guard = StreamGuard(
            self._js,
            self._streams,
            replicas=settings.jetstream_replicas,
            on_drift=drift_reporter(self._publisher, self.service),
        )
        self._guard.start()
        self.stack.push_async_callback(self._guard.stop)

    async def _close(self) -> None:
        self.started = False
        self.stopping.set()
        await _run_each(self._on_stop)
        await _cancel(self._cancelled)
        await _run_each(self._on_drain)
        await self._wait_for_tasks()
        await self.stack.aclose()

    async def _wait_for_tasks(self) -> None:
        if not self._drained:
            return
        _, pending = await asyncio.wait(set(self._drained), timeout=self._drain_timeout_s)
        for task in pending:
            log.warning("%s did not stop in time; cancelling", task.get_name())
        await _cancel(pending)

    @staticmethod
    async def _drain_bus(nc: NATS) -> None:
        if not nc.is_closed:
            with contextlib.suppress(Exception):  # a dead bus has nothing left to drain
                await nc.drain()

    # -- readiness ---------------------------------------------------------------------

    async def _nats_ready(self) -> bool:
        return self.started and self._nc is not None and self._nc.is_connected

    async def _redis_ready(self) -> bool:
        return self.started and self._redis is not None and bool(await self._redis.ping())

    async def _streams_ready(self) -> bool:
        return self.started and self._guard is not None and await self._guard.ready()


def started(part: T | None) -> T:
    """`part` of a service, once its start has made it; RuntimeError before."""
    if part is None:
        raise RuntimeError("the service is not started")
    return part


async def _run_each(callbacks: list[StopCallback]) -> None:
    """Every callback runs: one that fails is logged and does not keep the others back."""
    for callback in callbacks:
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.warning("stop step %s failed: %s", _name(callback), type(exc).__name__)


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended with %r", task.get_name(), task.exception())


def _name(callback: StopCallback) -> str:
    return getattr(callback, "__qualname__", type(callback).__name__)
