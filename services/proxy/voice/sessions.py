"""The sidebands one replica holds, their leases, and taking over a dead replica's.

Every `tick_s` (0.5 s) one pipelined round trip renews this replica's owner leases and
one more asks, per session, for a close request or a revoked token; the max session
length is checked locally. So a revocation, `keyveil sessions close` or the time limit
ends a session within tick + close (< 2 s).

Every `scan_s` (1 s) it looks for live sessions without an owner (their replica died:
its lease of `lease_ms` expired) and claims them with SET NX, so exactly one replica
re-attaches each, within lease + scan (< 10 s).

At shutdown it lets go of its leases without ending the sessions, so another replica
takes them over at once instead of after the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Coroutine
from typing import Any

import redis.exceptions

from shared.voicepolicy import VoiceApi
from shared.voicesessions import VoiceRegistry, VoiceSession

from .metrics import ENDED, LIVE, TAKEOVERS
from .sideband import Sideband, SidebandContext

__all__ = ["VoiceSessions", "replica_id"]

log = logging.getLogger(__name__)

_REDIS_TROUBLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_REASONS = frozenset(
    {
        "token_revoked",
        "operator",
        "max_duration",
        "policy_violation",
        "upstream_gone",
        "sideband_lost",
        "close_requested",
        "expired",
        "content",
        "remote_hangup",
        "connection_lost",
    }
)


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class VoiceSessions:
    """Owns this replica's sidebands; start with `start()`, stop with `aclose()`."""

    def __init__(
        self,
        ctx: SidebandContext,
        *,
        lease_ms: int = 4000,
        tick_s: float = 0.5,
        scan_s: float = 1.0,
        max_claims: int = 250,
    ) -> None:
        self.ctx = ctx
        self.registry: VoiceRegistry = ctx.registry
        self._lease_ms = lease_ms
        self._tick_s = tick_s
        self._scan_s = scan_s
        self._max_claims = max_claims
        self._held: dict[str, Sideband] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def held(self) -> dict[str, Sideband]:
        return self._held

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(
            self._supervise(), name="voice-sessions"
        )

    async def register(self, record: VoiceSession) -> None:
        """A session this replica just brokered: record it, own it, attach its sideband."""
        await self.registry.create(record, owner=self.ctx.replica, lease_ms=self._lease_ms)
        if self._closed:  # brokered while this replica stops: another one attaches it
            await self.registry.release(record.id, owner=self.ctx.replica)
            return
        self._hold(record)

    def _hold(self, record: VoiceSession) -> None:
        sideband = Sideband(self.ctx, record)
        self._held[record.id] = sideband
        LIVE.labels(record.api).inc()
        sideband.start()
        task = asyncio.get_running_loop().create_task(self._watch(sideband))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, sideband: Sideband) -> None:
        await sideband.ended.wait()
        self._forget(sideband, ended=True)

    def _forget(self, sideband: Sideband, *, ended: bool) -> None:
        if self._held.pop(sideband.session_id, None) is None:
            return
        LIVE.labels(sideband.api.value).dec()
        if ended:
            reason = sideband.record.closed_reason or "closed"
            ENDED.labels(sideband.api.value, reason if reason in _REASONS else "other").inc()

    async def close(self, session_id: str, reason: str) -> bool:
        sideband = self._held.get(session_id)
        if sideband is None:
            return False
        sideband.record.closed_reason = reason
        await sideband.end(reason)
        return True

    # -- the loop --------------------------------------------------------------------

    async def _supervise(self) -> None:
        last_scan = 0.0
        while True:
            started = time.monotonic()
            try:
                await self._tick()
                if started - last_scan >= self._scan_s:
                    last_scan = started
                    await self._scan()
            except asyncio.CancelledError:
                raise
            except _REDIS_TROUBLE as exc:
                log.warning("voice registry unreachable (%s)", type(exc).__name__)
            except Exception as exc:
                log.error("voice supervisor error (%s)", type(exc).__name__, exc_info=exc)
            await asyncio.sleep(max(0.0, self._tick_s - (time.monotonic() - started)))

    async def _tick(self) -> None:
        held = [s for s in self._held.values() if not s.ended.is_set()]
        if not held:
            return
        ids = [s.session_id for s in held]
        kept = await self.registry.renew(ids, owner=self.ctx.replica, lease_ms=self._lease_ms)
        still: list[Sideband] = []
        for sideband, ok in zip(held, kept, strict=True):
            if ok:
                still.append(sideband)
            else:
                # Another replica owns it now (we were too slow to renew): stand down.
                log.warning("voice session lease lost; letting go of its sideband")
                self._forget(sideband, ended=False)
                self._spawn(sideband.let_go())
        if not still:
            return
        reasons = await self.registry.close_requests(
            [s.session_id for s in still], [s.record.token_id for s in still]
        )
        now = time.time()
        for sideband, reason in zip(still, reasons, strict=True):
            if reason is None and now >= sideband.record.ends_at:
                reason = "max_duration"
            if reason is not None:
                sideband.record.closed_reason = reason
                self._spawn(sideband.end(reason))

    async def _scan(self) -> None:
        others = [sid for sid in await self.registry.live_ids() if sid not in self._held]
        orphans = await self.registry.unowned(others)
        # Random order and a cap per scan: after a replica dies, the survivors share its
        # sessions instead of racing for the same ones, and one scan stays short.
        random.shuffle(orphans)
        for session_id in orphans[: self._max_claims]:
            if not await self.registry.claim(
                session_id, owner=self.ctx.replica, lease_ms=self._lease_ms
            ):
                continue
            record = await self.registry.get(session_id)
            if record is None:
                await self.registry.forget(session_id)
                continue
            if record.status == "closed":
                await self.registry.mark_closed(session_id, record.closed_reason or "closed")
                await self.registry.release(session_id, owner=self.ctx.replica)
                continue
            TAKEOVERS.labels(VoiceApi(record.api).value).inc()
            log.info("took over a voice session's sideband from a lapsed replica")
            self._hold(record)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop supervising; let go of every sideband without ending its session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        started = time.monotonic()
        held = list(self._held.values())
        for sideband in held:
            self._forget(sideband, ended=False)
        if held:
            await asyncio.wait([asyncio.ensure_future(s.let_go()) for s in held], timeout=3)
        with contextlib.suppress(*_REDIS_TROUBLE):
            await self.registry.release_all(
                [s.session_id for s in held if not s.ended.is_set()], owner=self.ctx.replica
            )
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        log.info("let go of %d voice sidebands in %.2f s", len(held), time.monotonic() - started)
