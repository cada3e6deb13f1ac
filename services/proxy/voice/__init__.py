"""Brokered voice sessions: GPT-Live sessions and Realtime calls, with a server sideband.

`broker` answers the two proxy paths, `sessions` holds this replica's sidebands and
takes over a dead replica's, `sideband` speaks to the provider, `sdp` checks offers.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import redis.asyncio as aioredis

from shared.budgets import Budgets
from shared.events import EventPublisher
from shared.metering import SpendMeter
from shared.voicepolicy import VoicePolicy
from shared.voicesessions import VoiceRegistry

from ..settings import Settings
from ..upstream import KeySource
from .broker import VoiceBroker
from .budget import VoiceBudget
from .sessions import VoiceSessions, replica_id
from .sideband import SidebandContext

__all__ = ["VoiceBroker", "VoiceSessions", "open_voice"]


async def open_voice(
    stack: AsyncExitStack,
    *,
    settings: Settings,
    redis: aioredis.Redis,
    keys: KeySource,
    publisher: EventPublisher | None,
    spend: SpendMeter | None = None,
    budgets: Budgets | None = None,
    policy: VoicePolicy | None = None,
) -> VoiceBroker:
    """The broker and its supervisor, started; `stack` stops them (sidebands let go).

    `policy` (the usage policy file's `[voice]` table) replaces the VOICE_* settings."""
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(
            settings.voice_upstream_timeout_s, connect=settings.upstream_connect_timeout_s
        ),
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
        trust_env=False,
        follow_redirects=False,
    )
    stack.push_async_callback(http.aclose)
    policy = policy or settings.voice_policy()
    budget = None
    if budgets is not None:
        budget = VoiceBudget(
            budgets,
            spend.prices if spend is not None else None,
            ahead_s=settings.voice_budget_ahead_s,
            ahead_tokens=settings.voice_budget_ahead_tokens,
            max_session_s=policy.max_session_s,
        )
    ctx = SidebandContext(
        base_url=settings.openai_base_url,
        keys=keys,
        http=http,
        registry=VoiceRegistry(redis),
        publisher=publisher,
        policy=policy,
        replica=replica_id(),
        spend=spend,
        budget=budget,
    )
    sessions = VoiceSessions(ctx, lease_ms=settings.voice_lease_ms)
    sessions.start()
    stack.push_async_callback(sessions.aclose)
    return VoiceBroker(
        base_url=settings.openai_base_url,
        policy=policy,
        keys=keys,
        http=http,
        sessions=sessions,
        budget=budget,
    )
