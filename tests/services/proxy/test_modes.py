"""Demo mode, and failing closed when Redis (nonces, limits, revocations) is down."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from keyveil.servers import ServerProcess, start_redis
from shared.tokens import Scope
from tests.sdp_samples import OFFER
from tests.support import FakeUpstream, ServiceProcess

from .conftest import CHAT, PREFIX, Browser, chat_body, proxy_env


@pytest.fixture(scope="module")
def demo_proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("demo") / "proxy.log"
    env = proxy_env(proxy_nats.url, redis_url, fake_upstream, VOICE_AGENT_DEMO_MODE="true")
    service = ServiceProcess("proxy", env, log).start()
    yield service
    service.stop()


@pytest.fixture
async def demo_browser(demo_proxy: ServiceProcess) -> AsyncIterator[Browser]:
    client = Browser(demo_proxy.url)
    yield client
    await client.close()


async def test_demo_mode_answers_without_the_upstream(
    demo_browser: Browser, upstream: FakeUpstream
) -> None:
    response = await demo_browser.post(CHAT, chat_body())
    assert response.status_code == 200
    assert "demo" in response.json()["choices"][0]["message"]["content"]
    streamed = await demo_browser.post(CHAT, chat_body(stream=True))
    assert streamed.text.rstrip().endswith("data: [DONE]")
    headers = demo_browser.signed_headers(demo_browser.token(), CHAT, chat_body(), key=b"1" * 32)
    refused = await demo_browser.http.post(CHAT, content=chat_body(), headers=headers)
    assert refused.status_code == 401
    assert upstream.calls() == []


async def test_redis_down_fails_closed(
    proxy_nats: ServerProcess,
    key_manager: ServiceProcess,
    fake_upstream: FakeUpstream,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    redis = start_redis(tmp_path)
    env = proxy_env(proxy_nats.url, redis.url, fake_upstream)
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start()
    browser = Browser(service.url)
    try:
        assert (await browser.post(CHAT, chat_body())).status_code == 200
        redis.kill()
        response = await browser.post(CHAT, chat_body())
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "security_unavailable"
        assert "Retry-After" in response.headers
        assert len(upstream.calls()) == 1
        assert (await browser.http.get("/readyz")).status_code == 503
    finally:
        await browser.close()
        service.stop()
        redis.stop()


async def test_demo_mode_has_no_voice_sessions(
    demo_browser: Browser, upstream: FakeUpstream
) -> None:
    """Demo mode holds no provider key, so a voice session is refused, not faked."""
    body = orjson.dumps({"transport": {"type": "webrtc", "sdp": OFFER}})
    token = demo_browser.token(scopes=(Scope.voice,))
    refused = await demo_browser.post(f"{PREFIX}/live/sessions", body, token)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "voice_unavailable"
    assert upstream.calls() == []
