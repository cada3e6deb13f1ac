"""The key-manager process: NATS handlers for leases and admin, and a metrics-only HTTP edge.

`KeyManager` builds its parts (store, handlers, policy loops) on a `ServiceRuntime`, so
tests can run one in-process; `create_app` serves the same runtime for `__main__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from nats.aio.client import Client as NATS

from services.keymanager.custody import Custody
from services.keymanager.keys import SERVICE, KeyPolicy, KeyService
from services.keymanager.leasing import LeaseDesk
from services.keymanager.providers import build_custody
from services.keymanager.recovery import CustodyDesk
from services.keymanager.settings import Settings
from services.keymanager.store import KeyStore
from shared.bus import Responder, traced_handler
from shared.crypto import KekRing
from shared.events import EventPublisher
from shared.keyadmin import ADMIN_PREFIX, OPERATOR_USER
from shared.leases import KEYMANAGER_QUEUE, LEASE_SUBJECT, ROTATED_SUBJECT, RotatedNotice
from shared.runtime import ServiceRuntime, started
from shared.streams import EDGE_STREAMS
from shared.telemetry import inject_context

__all__ = ["KeyManager", "create_app"]

log = logging.getLogger(__name__)

_CUSTODY_RETRY_S = 5.0


class KeyManager:
    """One key-manager replica: start it, serve, stop it (drains and flushes)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings, service=SERVICE, streams=EDGE_STREAMS)
        self.runtime.ready_when("kek", self.kek_ready)
        self.custody: Custody = build_custody(settings)
        # Fingerprints, derived ids and the intake key; filled when the custody record opens.
        self.keyring: KekRing = self.custody.ring
        self._keys: KeyService | None = None
        self._bootstrap_pending = False

    @property
    def keys(self) -> KeyService:
        return started(self._keys)

    @property
    def nc(self) -> NATS:
        return self.runtime.nc

    @property
    def events(self) -> EventPublisher:
        return self.runtime.publisher

    async def start(self) -> None:
        await self.runtime.start(self.build)

    async def stop(self) -> None:
        await self.runtime.stop()

    async def build(self) -> None:
        """The key-manager's part of the start, once the runtime's bus and publisher are up."""
        settings = self.settings
        runtime = self.runtime
        runtime.stack.callback(self.custody.close)
        store = KeyStore(
            runtime.js,
            bucket=settings.kv_bucket,
            replicas=settings.kv_replicas,
            history=settings.kv_history,
        )
        await store.open()
        self._keys = KeyService(
            store=store,
            custody=self.custody,
            events=runtime.publisher,
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
            responder=Responder(runtime.nc, settings.allowed_requesters),
        )
        admin = CustodyDesk(
            keys=self._keys,
            keyring=self.keyring,
            settings=settings,
            responder=Responder(runtime.nc, {OPERATOR_USER}),
        )
        await runtime.serve(
            LEASE_SUBJECT,
            traced_handler(__name__, "km.lease", leases.handle),
            queue=KEYMANAGER_QUEUE,
        )
        await runtime.serve(
            f"{ADMIN_PREFIX}.*",
            traced_handler(__name__, "km.admin", admin.handle),
            queue=KEYMANAGER_QUEUE,
        )
        await runtime.nc.flush()
        runtime.spawn(self._policy_loop(), name="key-policy")
        if settings.kek_rewrap_interval_s is not None:
            runtime.spawn(self._rewrap_loop(), name="kek-rewrap")
        log.info(
            "key manager serving %s (KEK provider %s, custody %s)",
            settings.node_env.value,
            self.custody.provider.name,
            "verified" if verified else "NOT verified: " + self.custody.status.reason,
        )

    async def kek_ready(self) -> bool:
        """The custody record opened under the configured KEK (reason: `keyveil keys doctor`)."""
        return self._keys is not None and self.custody.status.ok

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
        while not self.runtime.stopping.is_set():
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
                await asyncio.wait_for(self.runtime.stopping.wait(), interval)

    async def _rewrap_loop(self) -> None:
        """KEK_REWRAP_INTERVAL_S: move records to the current KEK version on a schedule."""
        interval = self.settings.kek_rewrap_interval_s or 86_400.0
        while not self.runtime.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runtime.stopping.wait(), interval)
            if self.runtime.stopping.is_set():
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
    app = manager.runtime.app("keyveil key-manager", manager.build)
    app.state.manager = manager
    return app
