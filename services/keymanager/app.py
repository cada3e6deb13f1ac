"""The key-manager process: NATS handlers for leases and admin, and a metrics-only HTTP edge.

`KeyManager` owns the running parts (connection, store, handlers, policy loop) so tests
can run one in-process; `create_app` wraps it in a FastAPI lifespan for `__main__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType

from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.keymanager.custody import Custody
from services.keymanager.keys import SERVICE, KeyPolicy, KeyService
from services.keymanager.leasing import LeaseDesk
from services.keymanager.providers import build_custody
from services.keymanager.recovery import CustodyDesk
from services.keymanager.settings import Settings
from services.keymanager.store import KeyStore
from shared.bus import Responder, connect, traced_handler
from shared.crypto import KekRing
from shared.events import EventPublisher, drift_reporter
from shared.httpedge import add_edge_routes, service_app
from shared.keyadmin import ADMIN_PREFIX, OPERATOR_USER
from shared.leases import KEYMANAGER_QUEUE, LEASE_SUBJECT, ROTATED_SUBJECT, RotatedNotice
from shared.streams import EDGE_STREAMS, StreamGuard
from shared.telemetry import inject_context, redactor

__all__ = ["KeyManager", "create_app"]

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT = 256
_CUSTODY_RETRY_S = 5.0


class KeyManager:
    """One key-manager replica: start it, serve, stop it (drains and flushes)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        redactor.register(*settings.secret_values())
        self.custody: Custody = build_custody(settings)
        # Fingerprints, derived ids and the intake key; filled when the custody record opens.
        self.keyring: KekRing = self.custody.ring
        self._nc: NATS | None = None
        self._connected = False
        self._events: EventPublisher | None = None
        self._keys: KeyService | None = None
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._policy_task: asyncio.Task[None] | None = None
        self._rewrap_task: asyncio.Task[None] | None = None
        self._bootstrap_pending = False
        self._streams: StreamGuard | None = None
        self._stopping = asyncio.Event()

    @property
    def keys(self) -> KeyService:
        if self._keys is None:
            raise RuntimeError("KeyManager.start() was not awaited")
        return self._keys

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("KeyManager.start() was not awaited")
        return self._nc

    async def start(self) -> None:
        settings = self.settings
        self._nc = await connect(settings, name=SERVICE, on_state=self._on_state)
        js = self._nc.jetstream(timeout=settings.nats_request_timeout_s)
        self._events = EventPublisher(js)
        self._events.start()
        self._streams = StreamGuard(
            js,
            EDGE_STREAMS,
            replicas=settings.jetstream_replicas,
            on_drift=drift_reporter(self._events, SERVICE),
        )
        self._streams.start()
        store = KeyStore(
            js,
            bucket=settings.kv_bucket,
            replicas=settings.kv_replicas,
            history=settings.kv_history,
        )
        await store.open()
        self._keys = KeyService(
            store=store,
            custody=self.custody,
            events=self._events,
            policy=KeyPolicy(
                rotation_grace_s=settings.rotation_grace_s,
                max_key_age_s=settings.max_key_age_s,
                rotation_due_interval_s=settings.rotation_due_interval_s,
            ),
            notify=self._publish_notice,
        )
        await self._keys.refresh()
        # Prove the KEK opens this bucket before serving; a wrong one leaves us not ready
        # (with the reason) rather than failing every lease later.
        verified = await self._keys.verify_custody()
        self._bootstrap_pending = settings.openai_api_key is not None
        if verified:
            await self._bootstrap()
        leases = LeaseDesk(
            keys=self._keys,
            settings=settings,
            responder=Responder(self._nc, settings.allowed_requesters),
        )
        admin = CustodyDesk(
            keys=self._keys,
            keyring=self.keyring,
            settings=settings,
            responder=Responder(self._nc, {OPERATOR_USER}),
        )
        self._subscriptions = [
            await self._nc.subscribe(
                LEASE_SUBJECT,
                queue=KEYMANAGER_QUEUE,
                cb=self._concurrent(traced_handler(__name__, "km.lease", leases.handle)),
            ),
            await self._nc.subscribe(
                f"{ADMIN_PREFIX}.*",
                queue=KEYMANAGER_QUEUE,
                cb=self._concurrent(traced_handler(__name__, "km.admin", admin.handle)),
            ),
        ]
        await self._nc.flush()
        self._policy_task = asyncio.create_task(self._policy_loop(), name="key-policy")
        if settings.kek_rewrap_interval_s is not None:
            self._rewrap_task = asyncio.create_task(self._rewrap_loop(), name="kek-rewrap")
        log.info(
            "key manager serving %s (KEK provider %s, custody %s)",
            settings.node_env.value,
            self.custody.provider.name,
            "verified" if verified else "NOT verified: " + self.custody.status.reason,
        )

    async def stop(self) -> None:
        self._stopping.set()
        for task in (self._policy_task, self._rewrap_task):
            if task is not None:
                await task
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self._streams is not None:
            await self._streams.stop()
        if self._events is not None:
            await self._events.close()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self.custody.close()

    async def __aenter__(self) -> KeyManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def ready(self) -> bool:
        return self._connected and self._keys is not None

    async def kek_ready(self) -> bool:
        """The custody record opened under the configured KEK (reason: `keyveil keys doctor`)."""
        return self._keys is not None and self.custody.status.ok

    async def streams_ready(self) -> bool:
        return self._streams is not None and await self._streams.ready()

    @property
    def events(self) -> EventPublisher:
        if self._events is None:
            raise RuntimeError("KeyManager.start() was not awaited")
        return self._events

    def _on_state(self, connected: bool) -> None:
        self._connected = connected

    def _concurrent(
        self, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """Answer requests concurrently (bounded), not one at a time per subscription."""

        async def run(msg: Msg) -> None:
            async with self._slots:
                await handler(msg)

        async def spawn(msg: Msg) -> None:
            task = asyncio.create_task(run(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return spawn

    async def _publish_notice(self, notice: RotatedNotice) -> None:
        try:
            await self.nc.publish(
                ROTATED_SUBJECT, notice.model_dump_json().encode(), headers=dict(inject_context({}))
            )
        except Exception as exc:  # requesters still expire their leases on their own
            log.warning("rotated notice not published: %s", type(exc).__name__)

    async def _bootstrap(self) -> None:
        """Import OPENAI_API_KEY, once the KEK has proven itself (never under a wrong one)."""
        key = self.settings.openai_api_key
        if not self._bootstrap_pending or key is None:
            return
        await self.keys.bootstrap(
            key.get_secret_value().encode(),
            provider="openai",
            environment=self.settings.node_env.value,
        )
        self._bootstrap_pending = False

    async def _policy_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.keys.enforce_policy()
                if await self.keys.verify_custody():
                    await self._bootstrap()
            except Exception as exc:  # NATS may be down for a while; try again next round
                log.warning("key policy round failed: %s", type(exc).__name__)
            # An unverified KEK (Vault sealed, KMS unreachable at start) is retried sooner.
            interval = self.settings.policy_interval_s
            if not self.custody.status.ok:
                interval = min(interval, _CUSTODY_RETRY_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def _rewrap_loop(self) -> None:
        """KEK_REWRAP_INTERVAL_S: move records to the current KEK version on a schedule."""
        interval = self.settings.kek_rewrap_interval_s or 86_400.0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            try:
                result = await self.keys.rewrap(actor=SERVICE)
                if result.rewrapped or result.failed:
                    log.info(
                        "scheduled rewrap: %d moved, %d failed",
                        result.rewrapped,
                        len(result.failed),
                    )
            except Exception as exc:  # the provider may be down; the next round tries again
                log.warning("scheduled rewrap failed: %s", type(exc).__name__)


def create_app(settings: Settings) -> FastAPI:
    manager = KeyManager(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.stop()

    app = service_app("keyveil key-manager", lifespan)
    app.state.manager = manager
    add_edge_routes(
        app, {"nats": manager.ready, "streams": manager.streams_ready, "kek": manager.kek_ready}
    )
    return app
