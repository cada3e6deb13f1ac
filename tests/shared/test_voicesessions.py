"""The voice registry against a real Redis: one claimant wins a lapsed lease, a replica
that lost its lease can neither renew nor release another's, and close requests and
revocations are seen per session."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from services.proxy.voice.sideband import sideband_url
from shared.tokens import revoked_key
from shared.voicepolicy import VoiceApi
from shared.voicesessions import LIVE_SET, VoiceRegistry, VoiceSession, owner_key


def record(**fields: object) -> VoiceSession:
    defaults: dict[str, object] = {
        "id": f"sess_{uuid.uuid4().hex[:12]}",
        "api": "live",
        "token_id": uuid.uuid4().hex,
        "token_session": uuid.uuid4().hex,
        "model": "gpt-live-1",
        "ends_at": time.time() + 60,
        "pinned": {"model": "gpt-live-1", "audio": {"output": {"voice": "marin"}}},
    }
    return VoiceSession.model_validate({**defaults, **fields})


async def test_the_record_round_trips_and_only_one_replica_claims_a_lapsed_session(
    redis_client: aioredis.Redis,
) -> None:
    registry = VoiceRegistry(redis_client)
    session = record(pending_event=None, billed_s=3.0)
    await registry.create(session, owner="replica-a", lease_ms=200)
    assert await registry.get(session.id) == session
    assert session.id in await registry.live_ids()
    assert await registry.unowned([session.id]) == []
    assert not await registry.claim(session.id, owner="replica-b", lease_ms=5000)

    await asyncio.sleep(0.3)  # replica-a died: its lease lapses
    assert await registry.unowned([session.id]) == [session.id]
    claims = await asyncio.gather(
        *(registry.claim(session.id, owner=f"replica-{i}", lease_ms=5000) for i in range(8))
    )
    assert sum(claims) == 1
    winner = await registry.owner(session.id)
    assert winner is not None
    # The dead owner's renewal and release do nothing to the new owner's lease.
    assert await registry.renew([session.id], owner="replica-a", lease_ms=5000) == [False]
    await registry.release(session.id, owner="replica-a")
    assert await registry.owner(session.id) == winner
    assert await registry.renew([session.id], owner=winner, lease_ms=5000) == [True]
    await registry.release_all([session.id], owner=winner)
    assert await registry.owner(session.id) is None

    await registry.mark_closed(session.id, "operator")
    closed = await registry.get(session.id)
    assert closed is not None
    assert (closed.status, closed.closed_reason) == ("closed", "operator")
    assert session.id not in await registry.live_ids()


async def test_close_requests_and_revocations_are_seen_per_session(
    redis_client: aioredis.Redis,
) -> None:
    registry = VoiceRegistry(redis_client)
    quiet, asked, revoked = record(), record(), record()
    for session in (quiet, asked, revoked):
        await registry.create(session, owner="replica-a", lease_ms=5000)
    assert await registry.request_close(asked.id, "abuse")
    assert not await registry.request_close("sess_unknown", "abuse")
    await redis_client.set(revoked_key(revoked.token_id), "1", ex=60)
    reasons = await registry.close_requests(
        [quiet.id, asked.id, revoked.id], [quiet.token_id, asked.token_id, revoked.token_id]
    )
    assert reasons == [None, "operator", "token_revoked"]
    for session in (quiet, asked, revoked):
        await registry.mark_closed(session.id, "test")


async def test_a_live_id_without_a_record_is_forgotten(redis_client: aioredis.Redis) -> None:
    registry = VoiceRegistry(redis_client)
    await redis_client.sadd(LIVE_SET, "sess_expired")
    await redis_client.set(owner_key("sess_expired"), "replica-z")
    await registry.forget("sess_expired")
    assert "sess_expired" not in await registry.live_ids()
    assert await registry.owner("sess_expired") is None


def test_sideband_urls_follow_the_base_url() -> None:
    assert (
        sideband_url("https://api.openai.com/v1", VoiceApi.live, "sess_1")
        == "wss://api.openai.com/v1/live/sessions/sess_1/attach"
    )
    assert (
        sideband_url("http://127.0.0.1:8090/v1/", VoiceApi.realtime, "rtc_1")
        == "ws://127.0.0.1:8090/v1/realtime?call_id=rtc_1"
    )
    assert sideband_url("https://gw.example/openai", VoiceApi.live, "a/b").endswith(
        "/openai/live/sessions/a%2Fb/attach"
    )
