"""Budgets through real proxies: one user's money budget and TPM under 300 concurrent
chat calls on three replicas, with random real usage from the fake provider; speech and
transcription reserved and settled; Redis away, failing closed or open."""

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
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, start_redis
from shared.budgets import CONFIG_KEY, BudgetAdmin, counter_key, window_index
from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices
from shared.tokens import ProxyClaims, Scope
from tests.support import FakeUpstream, ServiceProcess

from .conftest import CHAT, SPEECH, STT, Browser, Token, chat_body, multipart, proxy_env

pytestmark = pytest.mark.slow

PRICES = load_prices(DEFAULT_PRICES_FILE)


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


def _user_token(browser: Browser, user: str) -> Token:
    now = int(time.time())
    claims = ProxyClaims(
        jti=uuid.uuid4().hex,
        sid=f"sess-{uuid.uuid4().hex[:8]}",
        scopes=[Scope.chat, Scope.speech, Scope.transcriptions],
        iat=now,
        exp=now + 300,
        origin="https://app.example.com",
        sub=user,
        app="budget-test",
    )
    value = browser.keyring.issue(claims)
    return Token(value, claims, browser.keyring.request_signing_key(value, claims.jti))


async def _events(bus: NATS, token_ids: set[str], timeout: float = 20.0) -> list[dict[str, Any]]:
    js = bus.jetstream()
    sub = await js.subscribe("keyveil.usage.proxy", ordered_consumer=True)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(found) < len(token_ids) and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                continue
            event: dict[str, Any] = orjson.loads(msg.data)
            if event.get("token_id") in token_ids:
                found[event["token_id"]] = event
    finally:
        await sub.unsubscribe()
    return list(found.values())


async def test_300_concurrent_calls_on_3_replicas_hold_one_user_budget_exactly(
    replicas: list[ServiceProcess],
    upstream: FakeUpstream,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
    bus: NATS,
) -> None:
    upstream.behave(random_usage=True, max_random_output=400)
    user = uuid.uuid4().hex
    limit = 20_000  # micro-dollars: $0.02, room for about a third of the calls
    await admin.set("user", user, "micros", "day", limit)
    browsers = [Browser(service.url) for service in replicas]
    body = chat_body(model="gpt-4o-mini", max_tokens=400)
    worst = Usage(input_tokens=len(body), output_tokens=400)
    largest_reservation = PRICES.cost("gpt-4o-mini", worst)
    assert largest_reservation is not None
    tokens = [_user_token(browsers[0], user) for _ in range(300)]
    try:

        async def call(i: int) -> tuple[str, int, dict[str, str], dict[str, Any]]:
            browser = browsers[i % 3]
            response = await browser.post(CHAT, body, tokens[i])
            return (
                tokens[i].claims.jti,
                response.status_code,
                dict(response.headers),
                response.json(),
            )

        results = await asyncio.gather(*(call(i) for i in range(300)))
    finally:
        for browser in browsers:
            await browser.close()
    ok = [r for r in results if r[1] == 200]
    refused = [r for r in results if r[1] == 429]
    assert len(ok) + len(refused) == 300
    assert ok, "no call fit the budget"
    assert refused, "the budget never bit"
    for _, _, headers, answer in refused:
        assert answer["error"]["code"] == "budget_exceeded"
        assert headers["ratelimit-policy"] == f'"budget-user-micros-day";q={limit};w=86400'
        assert headers["ratelimit"].startswith('"budget-user-micros-day";r=')
        assert int(headers["retry-after"]) >= 1
    # Upstream saw exactly the admitted calls; their usage events cost what Redis counted.
    assert len(upstream.calls()) == len(ok)
    events = await _events(bus, {r[0] for r in ok})
    assert len(events) == len(ok)
    spent_by_events = sum(e["cost_micros"] for e in events)
    reported = sum(
        PRICES.cost(
            "gpt-4o-mini",
            Usage(
                input_tokens=c["usage"]["input_tokens"],
                cached_tokens=c["usage"]["cached_tokens"],
                output_tokens=c["usage"]["output_tokens"],
            ),
        )
        or 0
        for c in upstream.calls()
    )
    assert spent_by_events == reported
    key = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    deadline = time.monotonic() + 5
    counted = -1
    while time.monotonic() < deadline:  # settlements are written just after the answers
        counted = int(await redis_client.get(key) or 0)
        [state] = await admin.show()
        if counted == spent_by_events and state.held == 0:
            break
        await asyncio.sleep(0.1)
    assert counted == spent_by_events
    assert counted <= limit + largest_reservation
    [state] = await admin.show()
    assert state.held == 0
    print(
        f"budget {limit} µ$: {len(ok)} admitted, {len(refused)} refused, spent {counted} µ$, "
        f"largest reservation {largest_reservation} µ$"
    )


async def test_an_abandoned_stream_is_settled_with_its_reservation(
    replicas: list[ServiceProcess],
    upstream: FakeUpstream,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(random_usage=True, chunk_delay_ms=300, stream_chunks=10)
    user = uuid.uuid4().hex
    await admin.set("user", user, "micros", "day", 1_000_000)
    await admin.set("user", user, "tokens", "minute", 100_000)
    browser = Browser(replicas[1].url)
    token = _user_token(browser, user)
    body = chat_body(model="gpt-4o-mini", max_tokens=300, stream=True)
    # What the proxy forwards (and reserves for): the body with include_usage added.
    forwarded = chat_body(
        model="gpt-4o-mini", max_tokens=300, stream=True, stream_options={"include_usage": True}
    )
    worst = Usage(input_tokens=len(forwarded), output_tokens=300)
    minute_before = window_index("minute", time.time())
    try:
        headers = browser.signed_headers(token, CHAT, body)
        async with browser.http.stream("POST", CHAT, content=body, headers=headers) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                break  # the tab closes mid-answer: no usage chunk ever arrives
    finally:
        await browser.close()
    day = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    minutes = {minute_before, window_index("minute", time.time())}  # a minute may turn
    minute_keys = [counter_key("user", user, "tokens", "minute", i) for i in minutes]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not await redis_client.get(day):
        await asyncio.sleep(0.1)
    # The provider billed what it generated, unknown to us: the whole estimate is kept.
    assert int(await redis_client.get(day) or 0) == PRICES.cost("gpt-4o-mini", worst)
    counted = [int(await redis_client.get(key) or 0) for key in minute_keys]
    assert sum(counted) == worst.total_tokens
    assert all(state.held == 0 for state in await admin.show())


async def test_a_user_tpm_holds_across_replicas_and_adds_up(
    replicas: list[ServiceProcess],
    upstream: FakeUpstream,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
    bus: NATS,
) -> None:
    upstream.behave(random_usage=True, max_random_output=300)
    user = uuid.uuid4().hex
    limit = 40_000  # tokens per minute
    await admin.set("user", user, "tokens", "minute", limit)
    browsers = [Browser(service.url) for service in replicas]
    body = chat_body(model="gpt-4o-mini", max_tokens=300)
    largest_reservation = len(body) + 300
    tokens = [_user_token(browsers[0], user) for _ in range(300)]
    minute_before = window_index("minute", time.time())
    try:
        statuses = await asyncio.gather(
            *(browsers[i % 3].post(CHAT, body, tokens[i]) for i in range(300))
        )
    finally:
        for browser in browsers:
            await browser.close()
    ok = [tokens[i].claims.jti for i, r in enumerate(statuses) if r.status_code == 200]
    refused = [r for r in statuses if r.status_code == 429]
    assert ok
    assert refused
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    events = await _events(bus, set(ok))
    assert len(events) == len(ok)
    used_by_events = sum(e["total_tokens"] for e in events)
    minutes = {minute_before, window_index("minute", time.time())}
    keys = [counter_key("user", user, "tokens", "minute", i) for i in minutes]
    deadline = time.monotonic() + 5
    counted = -1
    while time.monotonic() < deadline:
        counted = sum([int(await redis_client.get(k) or 0) for k in keys])
        if counted == used_by_events:
            break
        await asyncio.sleep(0.1)
    assert counted == used_by_events
    assert counted <= len(minutes) * limit + largest_reservation


async def test_a_proxy_killed_mid_stream_leaves_its_reservation_to_lapse(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    upstream: FakeUpstream,
    admin: BudgetAdmin,
    tmp_path: Path,
) -> None:
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        KEYVEIL_BUDGETS="true",
        KEYVEIL_BUDGET_HOLD_TTL_S="2",
        UPSTREAM_READ_TIMEOUT_S="10",
    )
    doomed = ServiceProcess("proxy", env, tmp_path / "doomed.log").start()
    upstream.behave(random_usage=True, chunk_delay_ms=1000, stream_chunks=20)
    user = uuid.uuid4().hex
    await admin.set("user", user, "micros", "day", 1_000_000)
    browser = Browser(doomed.url)
    token = _user_token(browser, user)
    body = chat_body(model="gpt-4o", max_tokens=4000, stream=True)
    headers = browser.signed_headers(token, CHAT, body)
    try:
        async with browser.http.stream("POST", CHAT, content=body, headers=headers) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                break
            doomed.kill()  # SIGKILL mid-answer: nothing settles the reservation
    except httpx.HTTPError:
        pass  # the connection dies with the process
    finally:
        await browser.close()
        doomed.stop()
    [state] = await admin.show()
    assert state.held > 0
    assert state.used == 0
    await asyncio.sleep(2.5)
    [state] = await admin.show()
    assert (state.held, state.used) == (0, 0)


@pytest.fixture
def budget_proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path: Path,
) -> Iterator[ServiceProcess]:
    env = proxy_env(proxy_nats.url, redis_url, fake_upstream, KEYVEIL_BUDGETS="true")
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start()
    yield service
    service.stop()


async def _settled(redis_client: aioredis.Redis, key: str, admin: BudgetAdmin) -> int:
    """The counter once nothing is held any more (settlements follow the answers)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(state.held == 0 for state in await admin.show()):
            break
        await asyncio.sleep(0.05)
    assert all(state.held == 0 for state in await admin.show())
    return int(await redis_client.get(key) or 0)


async def test_speech_is_reserved_and_settled_from_its_reported_usage(
    budget_proxy: ServiceProcess,
    upstream: FakeUpstream,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
    bus: NATS,
) -> None:
    upstream.behave(random_usage=True)
    user = uuid.uuid4().hex
    await admin.set("user", user, "micros", "day", 1_000_000)
    browser = Browser(budget_proxy.url)
    text = "Hello there, how are you today?"
    key = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    try:
        plain = _user_token(browser, user)
        body = orjson.dumps({"model": "tts-1", "voice": "alloy", "input": text})
        assert (await browser.post(SPEECH, body, plain)).status_code == 200
        sse = _user_token(browser, user)
        body = orjson.dumps(
            {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": text, "stream_format": "sse"}
        )
        assert (await browser.post(SPEECH, body, sse)).status_code == 200
        events = await _events(bus, {plain.claims.jti, sse.claims.jti})
        assert len(events) == 2
        assert all(e["cost_micros"] > 0 for e in events)
        assert await _settled(redis_client, key, admin) == sum(e["cost_micros"] for e in events)
        # The estimate (16384 audio tokens at $12 per 1M: ~$0.2) does not fit what is left.
        await admin.set("user", user, "micros", "day", int(await redis_client.get(key) or 0) + 1000)
        calls = len(upstream.calls())
        refused = await browser.post(SPEECH, body, _user_token(browser, user))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert refused.headers["ratelimit-policy"].startswith('"budget-user-micros-day"')
        assert len(upstream.calls()) == calls
    finally:
        await browser.close()


async def test_transcription_is_reserved_from_the_upload_and_settled_from_its_usage(
    budget_proxy: ServiceProcess,
    upstream: FakeUpstream,
    admin: BudgetAdmin,
    redis_client: aioredis.Redis,
    bus: NATS,
) -> None:
    user = uuid.uuid4().hex
    await admin.set("user", user, "micros", "day", 1_000_000)
    await admin.set("user", user, "tokens", "minute", 1_000_000)
    browser = Browser(budget_proxy.url)
    audio = b"RIFF" + b"\x00" * 64_000
    day = counter_key("user", user, "micros", "day", window_index("day", time.time()))
    try:
        tokens = []
        for model, extra in (("whisper-1", {}), ("gpt-4o-transcribe", {"stream": "true"})):
            token = _user_token(browser, user)
            body, content_type = multipart(audio, model=model, **extra)
            response = await browser.post(STT, body, token, content_type=content_type)
            assert response.status_code == 200
            tokens.append(token.claims.jti)
        events = await _events(bus, set(tokens))
        assert len(events) == 2
        assert await _settled(redis_client, day, admin) == sum(e["cost_micros"] for e in events)
        reported = [c["usage"] for c in upstream.calls()]
        assert reported[0]["seconds"] == len(audio) // 16_000  # whisper-1: billed by duration
        # Reserved from the size (65 s at 1 kB/s, at $0.006 a minute: 6500 micro-dollars),
        # so a budget with less left refuses before the upload goes anywhere.
        await admin.set("user", user, "micros", "day", int(await redis_client.get(day) or 0) + 6000)
        body, content_type = multipart(audio, model="whisper-1")
        refused = await browser.post(
            STT, body, _user_token(browser, user), content_type=content_type
        )
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert len(upstream.calls()) == 2
    finally:
        await browser.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_away_refuses_budgeted_calls_or_lets_them_through(
    proxy_nats: ServerProcess,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    upstream: FakeUpstream,
    tmp_path: Path,
    mode: str,
) -> None:
    own = start_redis(tmp_path, name="budget-redis")
    env = proxy_env(
        proxy_nats.url,
        own.url,
        fake_upstream,
        KEYVEIL_BUDGETS="true",
        KEYVEIL_BUDGET_FAILURE_MODE=mode,
        PROXY_RATE_LIMIT_FAILURE_MODE="local",  # else the admission itself refuses first
    )
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start()
    browser = Browser(service.url)
    try:
        assert (await browser.post(CHAT, chat_body())).status_code == 200
        own.stop()  # Valkey goes away under the running proxy
        response = await browser.post(CHAT, chat_body())
        if mode == "closed":
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "budget_unavailable"
            assert response.headers["retry-after"] == "1"
            assert len(upstream.calls()) == 1
        else:
            assert response.status_code == 200
            assert len(upstream.calls()) == 2
    finally:
        await browser.close()
        service.stop()
        own.stop()
