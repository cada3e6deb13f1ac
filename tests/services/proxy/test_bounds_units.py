"""The pure parts of the proxy's bounds: header joining, body timeouts, the spool budget,
the cache's database and the settings that refuse a bound that cannot work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.proxy.bodies import BodyTimeoutError, ClientGoneError, SpoolBudget, read_chunks
from services.proxy.settings import Settings, with_database
from services.proxy.upstream import combine_headers
from shared.errors import ConfigError, UnavailableError
from shared.settings import load_settings
from tests.support import TEST_PROXY_SIGNING_KEY


def test_repeated_headers_are_joined_once_in_order() -> None:
    raw = [(b"Accept", b"a"), (b"X-Other", b"1"), (b"accept", b"b"), (b"ACCEPT", b"c")]
    assert combine_headers(raw) == {"accept": "a, b, c", "x-other": "1"}


def test_header_joining_is_linear() -> None:
    raw = [(b"x-repeat", b"abcdefgh")] * 50_000
    started = time.perf_counter()
    joined = combine_headers(raw)
    elapsed = time.perf_counter() - started
    assert len(joined["x-repeat"]) == 50_000 * 10 - 2
    assert elapsed < 1.0  # ~50 ms; one join per repeat (the old code) took 7 s


def _receiver(*messages: dict[str, Any], then_wait: bool = True) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    return receive


async def _collect(chunks: AsyncIterator[bytes], into: list[bytes]) -> None:
    async for chunk in chunks:
        into.append(chunk)


async def test_a_body_that_stops_arriving_is_408() -> None:
    receive = _receiver({"type": "http.request", "body": b"abc", "more_body": True})
    chunks: list[bytes] = []
    started = time.monotonic()
    with pytest.raises(BodyTimeoutError) as refused:
        await _collect(read_chunks(receive, idle_s=0.2, total_s=10), chunks)
    assert chunks == [b"abc"]
    assert 0.15 < time.monotonic() - started < 1.0
    assert refused.value.status == 408
    assert refused.value.code == "body_timeout"
    assert refused.value.headers["Connection"] == "close"


async def test_a_trickled_body_meets_the_deadline() -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    started = time.monotonic()
    with pytest.raises(BodyTimeoutError):
        async for _ in read_chunks(receive, idle_s=1.0, total_s=0.3):
            pass
    assert 0.25 < time.monotonic() - started < 1.0


async def test_a_whole_body_and_a_disconnect() -> None:
    receive = _receiver(
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
    )
    assert [c async for c in read_chunks(receive, idle_s=1, total_s=1)] == [b"a", b"b"]
    gone = _receiver({"type": "http.disconnect"})
    with pytest.raises(ClientGoneError):
        async for _ in read_chunks(gone, idle_s=1, total_s=1):
            pass


def test_the_spool_budget_reserves_and_returns() -> None:
    budget = SpoolBudget(1000)
    first = budget.reserve(content_length="600", limit=800)
    with pytest.raises(UnavailableError) as refused:
        budget.reserve(content_length="600", limit=800)
    assert refused.value.code == "upload_capacity"
    assert refused.value.headers["Retry-After"] == "2"
    assert budget.reserve(content_length="400", limit=800) == 400
    budget.release(first)
    assert budget.in_use == 400
    # No declared length: the size cap is reserved.
    assert budget.reserve(content_length=None, limit=600) == 600
    assert budget.in_use == 1000


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/1"),
        ("rediss://:pw@redis.internal:6380/3?ssl_cert_reqs=required", None),
        ("redis://h:1/0?db=0", "redis://h:1/1"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=1"),
    ],
)
def test_the_cache_database(url: str, expected: str | None) -> None:
    if expected is None:
        expected = "rediss://:pw@redis.internal:6380/1?ssl_cert_reqs=required"
    assert with_database(url, 1) == expected


def _settings(**env: Any) -> Settings:
    return load_settings(Settings, PROXY_SIGNING_KEY=TEST_PROXY_SIGNING_KEY, **env)


def test_bound_settings_defaults_and_refusals(tmp_path: Path) -> None:
    settings = _settings(REDIS_URL="redis://r:6379/0")
    assert settings.response_cache_redis_url == "redis://r:6379/1"
    assert settings.spool_budget_bytes >= settings.max_upload_bytes
    assert settings.write_timeout_s == 30.0
    assert _settings(PROXY_CACHE_REDIS_URL="redis://c:6379/0").response_cache_redis_url == (
        "redis://c:6379/0"
    )
    assert _settings(PROXY_SPOOL_DIR=str(tmp_path)).spool_dir == tmp_path
    with pytest.raises(ConfigError, match="PROXY_SPOOL_DIR"):
        _settings(PROXY_SPOOL_DIR=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="PROXY_SPOOL_BUDGET_BYTES"):
        _settings(PROXY_SPOOL_BUDGET_BYTES=1024 * 1024)
    with pytest.raises(ConfigError, match="PROXY_WRITE_TIMEOUT_S"):
        _settings(PROXY_WRITE_TIMEOUT_S=0)
