"""Admission against a real Redis: GCRA arithmetic, layers, nonces, revocation, blocks, outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from keyveil.servers import start_redis
from shared.principals import revoked_user_key
from shared.ratelimit import (
    Admission,
    Decision,
    FailureMode,
    Limit,
    LocalGcra,
    rate_key,
    redis_client,
)
from shared.tokens import revoked_key


def _subject() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    conn = redis_client(redis_url, timeout_s=1.0)
    yield conn
    await conn.aclose()


@pytest.fixture
def admission(client: aioredis.Redis) -> Admission:
    return Admission(client, service="test", block_after_strikes=3, block_for_s=30)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_gcra_arithmetic_is_exact() -> None:
    clock = _Clock()
    gcra = LocalGcra(clock=clock)
    limit = Limit("ip", "a", limit=5, period_s=10)
    answers = [gcra.check([limit]) for _ in range(5)]
    assert [a.remaining for a in answers] == [4, 3, 2, 1, 0]
    assert [a.reset_after_s for a in answers] == [2.0, 4.0, 6.0, 8.0, 10.0]
    refused = gcra.check([limit])
    assert (refused.allowed, refused.reason) == (False, "rate_limited")
    assert refused.retry_after_s == pytest.approx(2.0)
    assert refused.reset_after_s == pytest.approx(10.0)
    clock.now += 1.999
    assert not gcra.check([limit]).allowed
    clock.now += 0.001
    again = gcra.check([limit])
    assert again.allowed
    assert again.remaining == 0
    clock.now += 10
    assert gcra.check([limit]).remaining == 4


def test_local_gcra_is_all_or_nothing() -> None:
    clock = _Clock()
    gcra = LocalGcra(clock=clock)
    wide = Limit("ip", "a", limit=3, period_s=60)
    narrow = Limit("token", "t", limit=1, period_s=60)
    assert gcra.check([wide, narrow]).remaining == 0
    refused = gcra.check([wide, narrow])
    assert (refused.allowed, refused.layer) == (False, "token")
    assert gcra.check([wide]).remaining == 1  # the refused call consumed nothing


def test_headers_follow_the_ietf_draft() -> None:
    allowed = Decision(
        allowed=True,
        reason="ok",
        layer="per-ip",
        limit=120,
        remaining=17,
        reset_after_s=22.2,
        window_s=60,
    )
    assert allowed.headers() == {
        "RateLimit-Policy": '"per-ip";q=120;w=60',
        "RateLimit": '"per-ip";r=17;t=23',
    }
    refused = Decision(
        allowed=False,
        reason="rate_limited",
        layer="per-ip",
        limit=120,
        remaining=0,
        reset_after_s=60,
        retry_after_s=0.2,
        window_s=60,
    )
    assert refused.headers()["Retry-After"] == "1"
    assert "Retry-After" not in Decision(allowed=False, reason="replay").headers()


async def test_redis_gcra_counts_down_and_refuses_with_retry_after(admission: Admission) -> None:
    limit = Limit("ip", _subject(), limit=5, period_s=10)
    answers = [await admission.check(limits=[limit], client_ip="10.0.0.1") for _ in range(5)]
    assert all(a.allowed for a in answers)
    assert [a.remaining for a in answers] == [4, 3, 2, 1, 0]
    for n, answer in enumerate(answers, start=1):
        assert 2.0 * n - 0.5 < answer.reset_after_s <= 2.0 * n
    refused = await admission.check(limits=[limit], client_ip="10.0.0.1")
    assert (refused.allowed, refused.reason, refused.layer) == (False, "rate_limited", "ip")
    assert 1.5 < refused.retry_after_s <= 2.0
    assert refused.headers()["Retry-After"] == "2"
    assert refused.headers()["RateLimit-Policy"] == '"ip";q=5;w=10'


async def test_redis_gcra_refills_at_the_emission_interval(admission: Admission) -> None:
    limit = Limit("ip", _subject(), limit=10, period_s=1)
    for _ in range(10):
        assert (await admission.check(limits=[limit], client_ip="10.0.0.1")).allowed
    refused = await admission.check(limits=[limit], client_ip="10.0.0.1")
    assert not refused.allowed
    await asyncio.sleep(refused.retry_after_s + 0.01)
    assert (await admission.check(limits=[limit], client_ip="10.0.0.1")).allowed
    assert not (await admission.check(limits=[limit], client_ip="10.0.0.1")).allowed


async def test_layers_are_all_or_nothing(admission: Admission, client: aioredis.Redis) -> None:
    wide = Limit("ip", _subject(), limit=3, period_s=60)
    narrow = Limit("token", _subject(), limit=1, period_s=60)
    first = await admission.check(limits=[wide, narrow], client_ip="10.0.0.2")
    assert (first.allowed, first.layer, first.remaining) == (True, "token", 0)
    before = await client.get(rate_key("ip", wide.subject))
    refused = await admission.check(limits=[wide, narrow], client_ip="10.0.0.2")
    assert (refused.allowed, refused.layer) == (False, "token")
    assert await client.get(rate_key("ip", wide.subject)) == before
    assert (await admission.check(limits=[wide], client_ip="10.0.0.2")).remaining == 1


async def test_nonce_replay_is_refused_and_refusals_do_not_burn_nonces(
    admission: Admission,
) -> None:
    limit = Limit("token", _subject(), limit=1, period_s=60)
    nonce = f"kid:{_subject()}"
    first = await admission.check(limits=[], client_ip="10.0.0.3", nonce=nonce, nonce_ttl_s=60)
    assert first.allowed
    replay = await admission.check(limits=[], client_ip="10.0.0.3", nonce=nonce, nonce_ttl_s=60)
    assert (replay.allowed, replay.reason) == (False, "replay")

    assert (await admission.check(limits=[limit], client_ip="10.0.0.3")).allowed
    fresh = f"kid:{_subject()}"
    limited = await admission.check(
        limits=[limit], client_ip="10.0.0.3", nonce=fresh, nonce_ttl_s=60
    )
    assert limited.reason == "rate_limited"
    unused = await admission.check(limits=[], client_ip="10.0.0.3", nonce=fresh, nonce_ttl_s=60)
    assert unused.allowed


async def test_revoked_token_is_refused(admission: Admission, client: aioredis.Redis) -> None:
    token_id = _subject()
    limit = Limit("token", token_id, limit=5, period_s=60)
    ok = await admission.check(limits=[limit], client_ip="10.0.0.4", revoked_token_id=token_id)
    assert ok.allowed
    await client.set(revoked_key(token_id), "1", ex=60)
    refused = await admission.check(limits=[limit], client_ip="10.0.0.4", revoked_token_id=token_id)
    assert (refused.allowed, refused.reason) == (False, "revoked")


async def test_repeated_strikes_block_the_ip(admission: Admission) -> None:
    ip = f"192.0.2.{int(time.time() * 1000) % 250}"
    limit = Limit("ip", _subject(), limit=100, period_s=60)
    assert [await admission.strike(ip, "auth") for _ in range(3)] == [False, False, True]
    refused = await admission.check(limits=[limit], client_ip=ip)
    assert (refused.allowed, refused.reason) == (False, "blocked")
    assert 29 < refused.retry_after_s <= 30
    assert refused.headers()["Retry-After"] == "30"
    assert await admission.strike(ip, "auth") is False  # already blocked: no second event
    assert (await admission.check(limits=[limit], client_ip="198.51.100.1")).allowed


async def test_script_flush_is_survived(admission: Admission, client: aioredis.Redis) -> None:
    limit = Limit("ip", _subject(), limit=2, period_s=60)
    assert (await admission.check(limits=[limit], client_ip="10.0.0.5")).allowed
    await client.script_flush()
    second = await admission.check(limits=[limit], client_ip="10.0.0.5")
    assert (second.allowed, second.remaining) == (True, 0)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_decisions_are_counted(admission: Admission) -> None:
    labels = {"service": "test", "layer": "metered", "result": "limited"}
    before = _metric("keyveil_ratelimit_decisions_total", **labels)
    limit = Limit("metered", _subject(), limit=1, period_s=60)
    await admission.check(limits=[limit], client_ip="10.0.0.6")
    await admission.check(limits=[limit], client_ip="10.0.0.6")
    assert _metric("keyveil_ratelimit_decisions_total", **labels) == before + 1


async def test_three_instances_share_one_limit(redis_url: str) -> None:
    clients = [redis_client(redis_url, timeout_s=2.0) for _ in range(3)]
    instances = [Admission(c, service="test") for c in clients]
    limit = Limit("ip", _subject(), limit=10, period_s=60)
    try:
        answers = await asyncio.gather(
            *(instances[i % 3].check(limits=[limit], client_ip="10.0.0.7") for i in range(90))
        )
    finally:
        for c in clients:
            await c.aclose()
    assert sum(a.allowed for a in answers) == 10
    assert {a.reason for a in answers if not a.allowed} == {"rate_limited"}


async def test_redis_outage_follows_each_failure_mode(tmp_path: Path) -> None:
    server = start_redis(tmp_path, name="rl-outage")
    conn = redis_client(server.url, timeout_s=0.3)
    admission = Admission(
        conn,
        service="test-outage",
        failure_modes={"open": FailureMode.open, "local": FailureMode.local},
    )
    closed = Limit("closed", "c", limit=100, period_s=60)
    opened = Limit("open", "o", limit=1, period_s=60)
    local = Limit("local", "l", limit=2, period_s=60)
    errors_before = _metric("keyveil_ratelimit_backend_errors_total", service="test-outage")
    try:
        assert (await admission.check(limits=[closed], client_ip="10.0.0.8")).allowed
        server.kill()

        started = time.monotonic()
        down = await admission.check(limits=[closed], client_ip="10.0.0.8")
        assert time.monotonic() - started < 1.5
        assert (down.allowed, down.reason) == (False, "unavailable")
        assert down.headers()["Retry-After"] == "1"
        assert admission.degraded
        # Closed wins when a closed layer is among the ones asked for.
        mixed = await admission.check(limits=[opened, closed], client_ip="10.0.0.8")
        assert mixed.reason == "unavailable"

        assert all(
            [
                (await admission.check(limits=[opened], client_ip="10.0.0.8")).allowed
                for _ in range(5)
            ]
        )

        local_answers = [
            await admission.check(limits=[local], client_ip="10.0.0.8") for _ in range(3)
        ]
        assert [a.allowed for a in local_answers] == [True, True, False]
        assert local_answers[2].reason == "rate_limited"

        nonce = "kid:n1"
        assert (
            await admission.check(limits=[opened], client_ip="x", nonce=nonce, nonce_ttl_s=60)
        ).allowed
        replay = await admission.check(limits=[opened], client_ip="x", nonce=nonce, nonce_ttl_s=60)
        assert replay.reason == "replay"
        assert await admission.strike("10.0.0.8", "auth") is False
        assert _metric("keyveil_ratelimit_backend_errors_total", service="test-outage") > (
            errors_before + 5
        )

        server.start()
        back = await admission.check(limits=[closed], client_ip="10.0.0.8")
        assert back.allowed
        assert back.remaining in (98, 99)  # 98 when the append-only file kept the first hit
        assert not admission.degraded
    finally:
        await conn.aclose()
        server.stop()


# -- the pipelined connection (the proxy's hot path) --------------------------------------


async def test_pipelined_answers_like_redis_py(client: aioredis.Redis) -> None:
    pipelined = Admission(client, service="test", pipelined=True)
    plain = Admission(client, service="test")
    try:
        for admission in (pipelined, plain):
            limit = Limit("ip", _subject(), limit=3, period_s=60)
            token = _subject()
            answers = [
                await admission.check(
                    limits=[limit], client_ip="10.0.1.1", nonce=f"{token}:{i}", nonce_ttl_s=60
                )
                for i in range(4)
            ]
            assert [a.allowed for a in answers] == [True, True, True, False]
            assert [a.remaining for a in answers[:3]] == [2, 1, 0]
            replay = await admission.check(
                limits=[Limit("ip", _subject(), 3, 60)],
                client_ip="10.0.1.1",
                nonce=f"{token}:0",
                nonce_ttl_s=60,
            )
            assert (replay.allowed, replay.reason) == (False, "replay")
            await client.set(revoked_key(token), "1", ex=60)
            revoked = await admission.check(
                limits=[Limit("ip", _subject(), 3, 60)],
                client_ip="10.0.1.1",
                revoked_token_id=token,
            )
            assert (revoked.allowed, revoked.reason) == (False, "revoked")
    finally:
        await pipelined.aclose()


async def test_pipelined_concurrent_checks_share_one_limit(client: aioredis.Redis) -> None:
    admission = Admission(client, service="test", pipelined=True)
    limit = Limit("ip", _subject(), limit=25, period_s=60)
    nonce = _subject()
    try:
        answers = await asyncio.gather(
            *(
                admission.check(
                    limits=[limit], client_ip="10.0.1.2", nonce=f"{nonce}:{i % 150}", nonce_ttl_s=60
                )
                for i in range(300)
            )
        )
    finally:
        await admission.aclose()
    # One connection keeps the order, so each reply must match its own request: the
    # first 25 are admitted (recording their nonces), the second use of those 25
    # nonces is a replay, everything else is over the limit.
    expected = ["ok"] * 25 + ["rate_limited"] * 125 + ["replay"] * 25 + ["rate_limited"] * 125
    assert [a.reason for a in answers] == expected


async def test_pipelined_reloads_a_flushed_script(client: aioredis.Redis) -> None:
    admission = Admission(client, service="test", pipelined=True)
    try:
        assert (await admission.check(limits=[], client_ip="10.0.1.3")).allowed
        await client.script_flush()
        assert (await admission.check(limits=[], client_ip="10.0.1.3")).allowed
    finally:
        await admission.aclose()


async def test_pipelined_outage_fails_closed_and_recovers(tmp_path: Path) -> None:
    server = start_redis(tmp_path, name="rl-pipelined")
    conn = redis_client(server.url, timeout_s=0.3)
    admission = Admission(conn, service="test-pipelined", pipelined=True)
    limit = Limit("closed", _subject(), limit=100, period_s=60)
    try:
        assert (await admission.check(limits=[limit], client_ip="10.0.1.4")).allowed
        port = server.port
        server.kill()
        started = time.monotonic()
        down = await admission.check(limits=[limit], client_ip="10.0.1.4")
        assert time.monotonic() - started < 1.5
        assert (down.allowed, down.reason) == (False, "unavailable")
        assert admission.degraded
        server = start_redis(tmp_path, name="rl-pipelined", port=port)
        back = await admission.check(limits=[limit], client_ip="10.0.1.4")
        assert back.allowed
        assert not admission.degraded
    finally:
        await admission.aclose()
        await conn.aclose()
        server.stop()


async def test_a_revoked_user_is_refused_for_tokens_issued_up_to_the_revocation(
    redis_client: aioredis.Redis,
) -> None:
    admission = Admission(redis_client, service="test")
    user = f"u_{uuid.uuid4().hex}"
    limit = Limit("per-user", user, 100, 60.0)
    issued_at = 1_700_000_000
    before = await admission.check(
        limits=[limit], client_ip="10.0.0.9", revoked_user=(user, issued_at)
    )
    assert before.allowed
    await redis_client.set(revoked_user_key(user), str(issued_at), ex=60)
    for iat in (issued_at - 100, issued_at):
        refused = await admission.check(
            limits=[limit], client_ip="10.0.0.9", revoked_user=(user, iat)
        )
        assert (refused.allowed, refused.reason) == (False, "revoked")
    later = await admission.check(
        limits=[limit], client_ip="10.0.0.9", revoked_user=(user, issued_at + 1)
    )
    assert later.allowed
    other = await admission.check(
        limits=[limit], client_ip="10.0.0.9", revoked_user=(f"u_{uuid.uuid4().hex}", 0)
    )
    assert other.allowed
    await redis_client.set(revoked_user_key(user), "not-a-time", ex=60)  # never a 5xx
    assert (
        await admission.check(limits=[limit], client_ip="10.0.0.9", revoked_user=(user, 0))
    ).allowed
