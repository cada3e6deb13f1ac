"""The policy's max session length ends a session on time, the voice metrics tell an SRE
what happened with bounded labels only (never a token or session id), and a provider
that refuses or stalls is a 502 or 504 with no session left behind."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from keyveil.servers import ServerProcess
from shared.voicesessions import VoiceRegistry
from tests.support import TEST_PROVIDER_KEY, FakeUpstream, ServiceProcess

from .conftest import Browser, proxy_env
from .voicekit import LIVE, VOICE, Peer, fake_session, open_live, peer, until

__all__ = ["peer"]  # fixture

MAX_S = 5


@pytest.fixture(scope="module")
def short_proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        VOICE_MAX_SESSION_S=str(MAX_S),
        VOICE_UPSTREAM_TIMEOUT_S="1",
        LOG_LEVEL="DEBUG",  # even at DEBUG, no handshake header or frame is logged
    )
    service = ServiceProcess("proxy", env, tmp_path_factory.mktemp("short") / "proxy.log")
    service.start()
    yield service
    service.stop()


@pytest.fixture
async def short_browser(short_proxy: ServiceProcess) -> AsyncIterator[Browser]:
    client = Browser(short_proxy.url)
    yield client
    await client.close()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_the_max_session_length_ends_the_session_and_is_metered(
    short_proxy: ServiceProcess,
    short_browser: Browser,
    upstream: FakeUpstream,
    peer: Peer,
    redis_client: aioredis.Redis,
) -> None:
    upstream.behave(voice_tick_ms=200)
    opened_at = time.monotonic()
    session_id, token = await open_live(short_browser, peer)
    metrics = httpx.get(f"{short_proxy.url}/metrics").text
    assert metric(metrics, "keyveil_voice_sessions_live", api="live") == 1.0
    assert metric(metrics, "keyveil_voice_session_setup_seconds_count", api="live") == 1.0

    await until(
        lambda: fake_session(upstream, session_id)["state"] == "closed",
        "the session outlived the policy's max length",
        timeout=MAX_S + 3,
    )
    lasted = time.monotonic() - opened_at
    assert MAX_S - 0.5 <= lasted <= MAX_S + 2.0
    record = await VoiceRegistry(redis_client).get(session_id)
    assert record is not None
    assert record.closed_reason == "max_duration"

    metrics = httpx.get(f"{short_proxy.url}/metrics").text
    assert metric(metrics, "keyveil_voice_sessions_live", api="live") == 0.0
    assert (
        metric(metrics, "keyveil_voice_sessions_ended_total", api="live", reason="max_duration")
        == 1.0
    )
    assert metric(metrics, "keyveil_voice_billable_seconds_total", api="live") >= 1.0
    voice_lines = "\n".join(line for line in metrics.splitlines() if "keyveil_voice" in line)
    for secret_or_id in (session_id, token.claims.jti, token.claims.sid, TEST_PROVIDER_KEY):
        assert secret_or_id not in metrics
    assert "keyveil_voice_sideband_reconnects_total" in voice_lines
    log = short_proxy.log()
    assert "voice sideband" in log or "live/sessions" in log  # the log does see the session
    for never in ("Authorization", "authorization:", "session.usage.updated", TEST_PROVIDER_KEY):
        assert never not in log


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        ({"fail_status": 500}, 502, "upstream_refused"),
        ({"fail_status": 429, "retry_after": 3}, 502, "upstream_rate_limited"),
        ({"fail_status": 401}, 502, "upstream_auth_failed"),
        ({"delay_ms": 2500}, 504, "upstream_timeout"),
    ],
)
async def test_a_provider_refusing_or_stalling_is_502_or_504(
    short_browser: Browser,
    upstream: FakeUpstream,
    peer: Peer,
    redis_client: aioredis.Redis,
    behaviour: dict[str, int],
    status: int,
    code: str,
) -> None:
    upstream.behave(**behaviour, fail_paths=["/v1/live/sessions", "/v1/realtime/calls"])
    live_before = set(await VoiceRegistry(redis_client).live_ids())
    body = orjson.dumps({"transport": {"type": "webrtc", "sdp": await peer.offer()}})
    answer = await short_browser.post(LIVE, body, short_browser.token(scopes=VOICE))
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
    assert TEST_PROVIDER_KEY not in answer.text
    assert "retry-after" not in answer.headers  # the provider's limits are not the client's
    assert set(await VoiceRegistry(redis_client).live_ids()) <= live_before
    calls = [c for c in upstream.calls() if c["path"] == "/v1/live/sessions"]
    assert len(calls) == 1
