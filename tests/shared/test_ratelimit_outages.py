"""A Redis that answers but cannot serve (full, loading, read-only...) is an outage, not a bug.

The translation (`shared.ratelimit.as_unavailable`) is checked on every kind of reply,
then both admission paths (redis-py and pipelined) against a real valkey filled to
its `maxmemory` under `noeviction`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from keyveil.servers import ServerProcess, free_port, redis_binary
from services.token.revocation import revoke_token
from shared.errors import UnavailableError
from shared.ratelimit import (
    Admission,
    FailureMode,
    Limit,
    RedisUnavailableError,
    as_unavailable,
    redis_client,
    redis_unavailable,
)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("refused"),
        redis.exceptions.TimeoutError("slow"),
        ConnectionRefusedError(),
        TimeoutError(),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.OutOfMemoryError("command not allowed", status_code="OOM"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.ClusterDownError("The cluster is down"),
        redis.exceptions.TryAgainError("Multiple keys request during rehashing"),
        # Raw replies (PipelinedScript, or codes redis-py does not map) keep their code.
        redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
        redis.exceptions.ResponseError("BUSY Redis is busy running a script."),
        redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"),
        redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis.exceptions.ResponseError("CLUSTERDOWN Hash slot not served"),
        redis.exceptions.ResponseError("TRYAGAIN Multiple keys request"),
        redis.exceptions.ResponseError("READONLY You can't write against a read only replica."),
        redis.exceptions.ResponseError("LOADING Redis is loading the dataset in memory"),
    ],
    ids=repr,
)
def test_outages_are_translated(error: Exception) -> None:
    outage = as_unavailable(error)
    assert isinstance(outage, RedisUnavailableError)
    with pytest.raises(RedisUnavailableError), redis_unavailable():
        raise error


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("ERR Error running script: attempt to compare nil"),
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key"),
        redis.exceptions.NoScriptError("No matching script"),
        redis.exceptions.DataError("Invalid input"),
    ],
    ids=repr,
)
def test_bugs_are_not_outages(error: Exception) -> None:
    assert as_unavailable(error) is None
    with pytest.raises(type(error)), redis_unavailable():
        raise error


def test_the_outage_names_the_reply_code_only() -> None:
    outage = as_unavailable(redis.exceptions.ResponseError("OOM used memory > 'maxmemory' k=v"))
    assert outage is not None
    assert str(outage) == "OOM"
    assert outage.reply_code == "OOM"


@pytest.fixture(scope="module")
def full_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    state: Path = tmp_path_factory.mktemp("full-redis-unit")
    port = free_port()
    server = ServerProcess(
        name="full-redis",
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
        argv=[
            *(redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""),
            *("--appendonly", "no", "--maxmemory", "2mb", "--maxmemory-policy", "noeviction"),
        ],
        log_path=state / "redis.log",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def full(full_redis: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(full_redis.url, timeout_s=1.0)
    for i in range(10_000):
        try:
            await client.set(f"fill:{i}", b"x" * 8192)
        except redis.exceptions.OutOfMemoryError:
            break
    else:
        pytest.fail("the server never filled up")
    yield client
    await client.aclose()


@pytest.mark.parametrize("pipelined", [False, True], ids=["redis-py", "pipelined"])
async def test_a_full_redis_follows_the_failure_modes(
    full: aioredis.Redis, pipelined: bool
) -> None:
    admission = Admission(
        full,
        service="test",
        failure_modes={"open": FailureMode.open, "local": FailureMode.local},
        pipelined=pipelined,
    )
    subject = uuid.uuid4().hex
    try:
        closed = await admission.check(limits=[Limit("closed", subject, 5, 60)], client_ip="ip")
        assert (closed.allowed, closed.refusal) == (False, "security_unavailable")
        assert closed.headers()["Retry-After"] == "1"
        assert admission.degraded
        opened = await admission.check(limits=[Limit("open", subject, 5, 60)], client_ip="ip")
        assert opened.allowed
        local = [
            await admission.check(limits=[Limit("local", subject, 2, 60)], client_ip="ip")
            for _ in range(3)
        ]
        assert [d.allowed for d in local] == [True, True, False]
        assert await admission.strike("ip", "invalid_token") is False  # not raised
    finally:
        await admission.aclose()


async def test_revocation_on_a_full_redis_is_unavailable(full: aioredis.Redis) -> None:
    with pytest.raises(UnavailableError) as refused:
        await revoke_token(full, uuid.uuid4().hex, 60)
    assert refused.value.code == "revocation_unavailable"


async def test_a_full_redis_recovers_when_room_is_made(full: aioredis.Redis) -> None:
    admission = Admission(full, service="test", pipelined=True)
    try:
        subject = uuid.uuid4().hex
        first = await admission.check(limits=[Limit("l", subject, 5, 60)], client_ip="ip")
        assert first.refusal == "security_unavailable"
        await full.flushdb()
        await asyncio.sleep(0.05)
        again = await admission.check(limits=[Limit("l", subject, 5, 60)], client_ip="ip")
        assert again.allowed
        assert not admission.degraded
    finally:
        await admission.aclose()
