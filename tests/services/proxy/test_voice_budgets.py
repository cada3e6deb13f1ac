"""Live voice sessions against budgets, on real proxy replicas and the fake's real
sidebands: a money budget and a seconds budget charged every tick (a warning at 90 %,
the end at 100 %), several concurrent sessions on three replicas holding one user's
seconds budget exactly, a refusal up front once it is spent, and a kill -9 takeover
that keeps charging the same budget without counting anything twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, start_redis
from services.proxy.voice.budget import VoiceBudget, subjects_of
from services.proxy.voice.sideband import voice_event_id
from shared.budgets import CONFIG_KEY, BudgetAdmin, Budgets, Metered, counter_key, window_index
from shared.events import UsageEvent
from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices
from shared.tokens import ProxyClaims, Scope
from shared.voicesessions import VoiceRegistry, VoiceSession
from tests.support import FakeUpstream, ServiceProcess

from .conftest import Browser, Token, proxy_env
from .voicekit import (
    CALLS,
    LIVE,
    Peer,
    call_form,
    fake_session,
    open_live,
    peer,
    until,
    usage_of,
    voice_fake,
)

pytestmark = pytest.mark.slow

__all__ = ["peer", "voice_fake"]  # fixtures

PRICES = load_prices(DEFAULT_PRICES_FILE)
AHEAD_S = 3  # VOICE_BUDGET_AHEAD_S: what a live session holds beyond its usage
AHEAD_TOKENS = 100  # VOICE_BUDGET_AHEAD_TOKENS: a Realtime call's (the fake bills 50 a tick)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Valkey of this module's own. In the shared one, the voice sessions that other
    modules' killed replicas left live are orphans every new replica tries to take over;
    with them, the takeover test's session sometimes never reached its budget's end
    within 40 s, only ever in the full suite."""
    server = start_redis(tmp_path_factory.mktemp("voice-budgets-redis"))
    yield server.url
    server.stop()


@pytest.fixture
def replicas(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path: Path,
) -> Iterator[list[ServiceProcess]]:
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        KEYVEIL_BUDGETS="true",
        VOICE_AGENT_USER_RATE_LIMIT="100000",
        VOICE_BUDGET_AHEAD_S=str(AHEAD_S),
        VOICE_BUDGET_AHEAD_TOKENS=str(AHEAD_TOKENS),
        VOICE_SIDEBAND_LEASE_MS="3000",
    )
    services = [ServiceProcess("proxy", env, tmp_path / f"proxy-{i}.log") for i in range(3)]
    for service in services:
        service.start(wait_ready=False)
    for service in services:
        service.wait_ready()
    yield services
    for service in services:
        service.stop()


@pytest.fixture
async def admin(redis_client: aioredis.Redis) -> AsyncIterator[BudgetAdmin]:
    await redis_client.delete(CONFIG_KEY)
    yield BudgetAdmin(redis_client)
    await redis_client.delete(CONFIG_KEY)


def _voice_token(browser: Browser, user: str) -> Token:
    now = int(time.time())
    claims = ProxyClaims(
        jti=uuid.uuid4().hex,
        sid=f"sess-{uuid.uuid4().hex[:8]}",
        scopes=[Scope.voice],
        iat=now,
        exp=now + 300,
        origin="https://app.example.com",
        sub=user,
        app="voice-budget-test",
    )
    value = browser.keyring.issue(claims)
    return Token(value, claims, browser.keyring.request_signing_key(value, claims.jti))


async def _offer() -> tuple[RTCPeerConnection, str]:
    """A browser's real SDP offer (the peer need not connect: the fake bills anyway)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, str(pc.localDescription.sdp)


async def _open(browser: Browser, token: Token, sdp: str) -> Any:
    body = orjson.dumps({"transport": {"type": "webrtc", "sdp": sdp}})
    return await browser.post(LIVE, body, token)


async def _closed(registry: VoiceRegistry, session_id: str) -> VoiceSession | None:
    record = await registry.get(session_id)
    return record if record is not None and record.status == "closed" else None


async def _all_metered(bus: NATS, records: list[VoiceSession]) -> list[dict[str, Any]]:
    """Every session's usage events, once each has reached its final watermark."""
    out: list[dict[str, Any]] = []
    for record in records:
        billed = [e for e in await usage_of(bus, record.id) if e["type"] == "voice.usage"]
        if not billed or max(e["seconds_total"] for e in billed) < record.billed_s:
            return []
        out += billed
    return out


async def _counted(redis_client: aioredis.Redis, key: str, want: int) -> int:
    deadline = time.monotonic() + 5
    while True:  # the last charge may land just after the event
        counted = int(await redis_client.get(key) or 0)
        if counted == want or time.monotonic() > deadline:
            return counted
        await asyncio.sleep(0.1)


async def test_a_live_session_is_warned_at_90_percent_and_ended_at_100_of_money(
    replicas: list[ServiceProcess],
    voice_fake: FakeUpstream,
    peer: Peer,
    bus: NATS,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    # gpt-live-1 at $0.001 a second; the fake bills 1 s per 250 ms tick: 1000 µ$ a tick.
    voice_fake.behave(voice_tick_ms=250)
    per_second = PRICES.cost("gpt-live-1", Usage(seconds=1))
    assert per_second == 1000
    limit = 3 * AHEAD_S * per_second + 300
    await admin.set("token", "*", "micros", "day", limit)
    browser = Browser(replicas[0].url)
    try:
        session_id, token = await open_live(
            browser, peer, {"model": "gpt-live-1", "audio": {"output": {"voice": "cedar"}}}
        )
    finally:
        await browser.close()
    registry = VoiceRegistry(redis_client)
    record = await until(
        lambda: _closed(registry, session_id), "the session over its budget is still open", 15
    )
    assert record.closed_reason == "budget_exceeded"
    assert fake_session(voice_fake, session_id)["state"] == "closed"
    billed = await until(lambda: _all_metered(bus, [record]), "the usage never reached JetStream")
    events = await usage_of(bus, session_id)
    warnings = [e for e in events if e["type"] == "voice.budget.warning"]
    spent = sum(e["cost_micros"] for e in billed)
    assert spent == PRICES.cost("gpt-live-1", Usage(seconds=record.billed_s))
    # Ended while its hold still covered its last report: within the budget, and not
    # before the room left was less than one hold.
    assert limit - 2 * AHEAD_S * per_second <= spent <= limit
    assert len(warnings) == 1
    assert warnings[0]["reason"] == {"kind": "budget_warning", "budget": "token-micros-day"}
    assert warnings[0]["token_id"] == token.claims.jti
    # Counted against this token's own counter under the default ('*') budget.
    key = counter_key("token", token.claims.jti, "micros", "day", window_index("day", time.time()))
    assert await _counted(redis_client, key, spent) == spent
    [state] = await admin.show()  # the '*' row shows the default's own (empty) counter
    assert state.unit == "micros"


async def test_a_seconds_budget_warns_at_90_percent_on_the_bus_and_ends_the_session(
    replicas: list[ServiceProcess],
    voice_fake: FakeUpstream,
    bus: NATS,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    voice_fake.behave(voice_tick_ms=250)
    user = uuid.uuid4().hex
    limit = 12
    await admin.set("user", user, "seconds", "day", limit)
    browser = Browser(replicas[1].url)
    pc, sdp = await _offer()
    try:
        token = _voice_token(browser, user)
        answer = await _open(browser, token, sdp)
        assert answer.status_code == 201, answer.text
        session_id = answer.json()["session"]["id"]
        registry = VoiceRegistry(redis_client)
        record = await until(lambda: _closed(registry, session_id), "still open", 15)
    finally:
        await browser.close()
        await pc.close()
    assert record.closed_reason == "budget_exceeded"
    billed = await until(lambda: _all_metered(bus, [record]), "the usage never reached JetStream")
    seconds = sum(e["seconds"] for e in billed)
    assert seconds == record.billed_s == fake_session(voice_fake, session_id)["seconds"]
    assert seconds <= limit
    warnings = [e for e in await usage_of(bus, session_id) if e["type"] == "voice.budget.warning"]
    assert [w["reason"] for w in warnings] == [
        {"kind": "budget_warning", "budget": "user-seconds-day"}
    ]
    assert warnings[0]["token_id"] == token.claims.jti
    key = counter_key("user", user, "seconds", "day", window_index("day", time.time()))
    assert await _counted(redis_client, key, int(seconds)) == seconds
    [state] = await admin.show()
    assert (state.unit, state.used, state.held) == ("seconds", seconds, 0)


async def test_concurrent_live_sessions_on_3_replicas_hold_one_user_seconds_budget(
    replicas: list[ServiceProcess],
    upstream: FakeUpstream,
    bus: NATS,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(voice_tick_ms=250)  # 1 billed second per 250 ms on every session
    user = uuid.uuid4().hex
    sessions = 6
    limit = 30  # seconds: 6 sessions hold 3 each at the open, then share what is left
    await admin.set("user", user, "seconds", "day", limit)
    browsers = [Browser(service.url) for service in replicas]
    offers = [await _offer() for _ in range(sessions + 1)]
    registry = VoiceRegistry(redis_client)
    try:
        answers = await asyncio.gather(
            *(
                _open(browsers[i % 3], _voice_token(browsers[0], user), offers[i][1])
                for i in range(sessions)
            )
        )
        assert [a.status_code for a in answers] == [201] * sessions, [a.text for a in answers]
        ids = [a.json()["session"]["id"] for a in answers]

        async def all_closed() -> list[VoiceSession]:
            found = [await _closed(registry, sid) for sid in ids]
            return [r for r in found if r is not None] if all(found) else []

        records = await until(all_closed, "a session outlived the budget", timeout=40)
    finally:
        for pc, _ in offers[:sessions]:
            await pc.close()
    assert {r.closed_reason for r in records} == {"budget_exceeded"}
    # The ledger: every session's events add up to what the provider billed it, and all
    # of them to the user's counter, exactly.
    billed = await until(lambda: _all_metered(bus, records), "usage missing on JetStream", 20)
    assert len({e["event_id"] for e in billed}) == len(billed)
    for record in records:
        mine = [e for e in billed if e["voice_session_id"] == record.id]
        provider = fake_session(upstream, record.id)["seconds"]
        assert sum(e["seconds"] for e in mine) == record.billed_s == provider
    spent = sum(e["seconds"] for e in billed)
    key = counter_key("user", user, "seconds", "day", window_index("day", time.time()))
    counted = await _counted(redis_client, key, int(spent))
    assert counted == spent
    # Never past the budget by more than the largest single reservation (a hold covers
    # two of a session's largest reports, at least AHEAD_S).
    largest_hold = max(AHEAD_S, 2 * max(e["seconds"] for e in billed))
    assert counted <= limit + largest_hold
    assert counted >= limit - sessions * largest_hold  # and ended only once it was used
    [state] = await admin.show()
    assert state.held == 0  # every ended session gave its hold back
    # Less left than one hold: a new session is refused before the provider is asked,
    # and the answer names the budget.
    left = 1
    await admin.set("user", user, "seconds", "day", counted + left)
    upstream_sessions = len(upstream_sessions_of(upstream))
    try:
        refused = await _open(browsers[2], _voice_token(browsers[0], user), offers[-1][1])
    finally:
        for browser in browsers:
            await browser.close()
        await offers[-1][0].close()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"
    policy = f'"budget-user-seconds-day";q={counted + left};w=86400'
    assert refused.headers["ratelimit-policy"] == policy
    assert refused.headers["ratelimit"].startswith(f'"budget-user-seconds-day";r={left};t=')
    assert int(refused.headers["retry-after"]) >= 1
    assert len(upstream_sessions_of(upstream)) == upstream_sessions
    print(
        f"seconds budget {limit}: {sessions} sessions on 3 replicas spent {counted} s "
        f"(largest hold {largest_hold} s)"
    )


def upstream_sessions_of(upstream: FakeUpstream) -> list[dict[str, Any]]:
    response = httpx.get(f"{upstream.url}/_fake/sessions")
    response.raise_for_status()
    return list(response.json()["sessions"])


async def test_a_taken_over_session_keeps_charging_the_same_budget_once(
    replicas: list[ServiceProcess],
    upstream: FakeUpstream,
    bus: NATS,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(voice_tick_ms=250)
    user = uuid.uuid4().hex
    limit = 60
    await admin.set("user", user, "seconds", "day", limit)
    first = replicas[0]
    assert first.process is not None
    browser = Browser(first.url)
    pc, sdp = await _offer()
    registry = VoiceRegistry(redis_client)
    key = counter_key("user", user, "seconds", "day", window_index("day", time.time()))
    try:
        answer = await _open(browser, _voice_token(browser, user), sdp)
        assert answer.status_code == 201, answer.text
        session_id = answer.json()["session"]["id"]
        await until(
            lambda: _counter_at_least(redis_client, key, 4), "no seconds charged before the kill"
        )
        first.kill()  # SIGKILL: its lease lapses, another replica re-attaches
        # As if it died inside its outbox: the next event published (acked) and charged,
        # the watermark not yet moved. The new owner replays it under the same id.
        await _die_inside_the_outbox(registry, bus, redis_client, session_id)
        await until(
            lambda: fake_session(upstream, session_id)["sideband_connects"] >= 2,
            "no replica re-attached the sideband",
            timeout=12,
        )
        owner = await registry.owner(session_id)
        assert owner is not None
        assert f":{first.process.pid}:" not in owner
        record = await until(lambda: _closed(registry, session_id), "still open", 40)
    finally:
        await browser.close()
        await pc.close()
    assert record.closed_reason == "budget_exceeded"
    assert record.attachments >= 2
    assert record.pending_event is None
    billed = await until(lambda: _all_metered(bus, [record]), "usage missing on JetStream", 20)
    assert len({e["event_id"] for e in billed}) == len(billed)
    seconds = sum(e["seconds"] for e in billed)
    assert seconds == record.billed_s == fake_session(upstream, session_id)["seconds"]
    # The new owner charged the same user budget, and the replayed event only once.
    assert await _counted(redis_client, key, int(seconds)) == seconds
    [state] = await admin.show()
    assert state.held == 0


async def _die_inside_the_outbox(
    registry: VoiceRegistry, bus: NATS, redis_client: aioredis.Redis, session_id: str
) -> None:
    record = await registry.get(session_id)
    assert record is not None
    if record.pending_event is not None:
        return  # it really died inside its outbox: the same case
    total = record.billed_s + 1  # the fake has billed it by its next tick
    event = UsageEvent(
        event_id=voice_event_id(session_id, "seconds", total),
        service="proxy",
        type="voice.usage",
        mode="voice",
        token_id=record.token_id,
        session_id=record.token_session,
        voice_session_id=session_id,
        path="/live/sessions",
        model=record.model,
        seconds=1.0,
        seconds_total=total,
    )
    await bus.jetstream().publish(
        event.subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id}
    )
    await Budgets(redis_client).voice(
        hold_id=VoiceBudget.hold_id(record),
        subjects=subjects_of(record.token_id, record.user, record.app),
        mode="tick",
        used=Metered(micros=0, seconds=1),
        ahead=Metered(micros=0, seconds=AHEAD_S),
        event_id=event.event_id,
    )
    await registry.update(session_id, pending_event=event.model_dump_json())


async def _counter_at_least(redis_client: aioredis.Redis, key: str, floor: int) -> bool:
    return int(await redis_client.get(key) or 0) >= floor


async def test_concurrent_realtime_calls_on_3_replicas_hold_one_user_token_budget(
    replicas: list[ServiceProcess],
    upstream: FakeUpstream,
    bus: NATS,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(voice_tick_ms=250)  # one response.done of 50 tokens per 250 ms
    user = uuid.uuid4().hex
    calls = 4
    limit = 1_000
    await admin.set("user", user, "tokens", "day", limit)
    browsers = [Browser(service.url) for service in replicas]
    offers = [await _offer() for _ in range(calls)]
    registry = VoiceRegistry(redis_client)

    async def call(i: int) -> Any:
        body, content_type = call_form(offers[i][1], {"type": "realtime"})
        token = _voice_token(browsers[0], user)
        return await browsers[i % 3].post(CALLS, body, token, content_type=content_type)

    try:
        answers = await asyncio.gather(*(call(i) for i in range(calls)))
        assert [a.status_code for a in answers] == [201] * calls, [a.text for a in answers]
        ids = [a.headers["x-keyveil-call-id"] for a in answers]

        async def all_closed() -> list[VoiceSession]:
            found = [await _closed(registry, sid) for sid in ids]
            return [r for r in found if r is not None] if all(found) else []

        records = await until(all_closed, "a call outlived the budget", timeout=40)
    finally:
        for browser in browsers:
            await browser.close()
        for pc, _ in offers:
            await pc.close()
    assert {r.closed_reason for r in records} == {"budget_exceeded"}

    async def metered() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for record in records:
            mine = [e for e in await usage_of(bus, record.id) if e["type"] == "voice.usage"]
            if sum(e["total_tokens"] for e in mine) < record.tokens:
                return []
            out += mine
        return out

    billed = await until(metered, "usage missing on JetStream", 20)
    assert len({e["event_id"] for e in billed}) == len(billed)
    spent = sum(e["total_tokens"] for e in billed)
    assert spent == sum(r.tokens for r in records)
    key = counter_key("user", user, "tokens", "day", window_index("day", time.time()))
    counted = await _counted(redis_client, key, spent)
    assert counted == spent
    largest_hold = max(AHEAD_TOKENS, 2 * max(e["total_tokens"] for e in billed))
    assert counted <= limit + largest_hold
    [state] = await admin.show()
    assert state.held == 0
    print(f"token budget {limit}: {calls} Realtime calls on 3 replicas spent {counted}")
