"""keyveil.js's WebRTC dance in headless Chromium against the fake upstream's real peer.

Chromium's fake microphone (--use-fake-device-for-media-stream) feeds `connectVoice`,
which makes the offer, posts it and applies the answer; the fake's aiortc peer answers,
sends its tone and speaks the data-channel events. The page is same-origin with the
voice endpoints: Playwright serves keyveil.js from the checkout and forwards `/v1/...`
requests to the fake unchanged, so the browser talks to the provider's own paths (the
proxy's broker in front of them is tested end to end with the whole stack).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Route, async_playwright

from services.token.demo import ASSETS
from tests.support import FakeUpstream

pytestmark = [pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ORIGIN = "http://voice.localhost"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    # The fake's peer offers only 127.0.0.1; Chromium pairs loopback only when allowed.
    "--allow-loopback-in-peer-connection",
]
KEY = "sk-test-browser-voice-0123"
BLANK_PAGE = "<!doctype html><title>voice</title>"

# Runs in the page: start a session through connectVoice, gather what the callbacks saw.
START = """async ({ api, tickWaitMs }) => {
    const { connectVoice } = await import("/keyveil.js");
    const seen = { events: [], usage: [], transcript: "", closed: null };
    const post = async (endpoint, body, type) => {
        const response = await fetch(`/v1/${endpoint}`, {
            method: "POST",
            headers: { "Content-Type": type, Authorization: "Bearer %KEY%" },
            body,
        });
        if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
        return response;
    };
    const session = await connectVoice({
        post, api, voice: "marin", model: api === "live" ? "gpt-live-1" : "gpt-realtime",
        onEvent: (event) => seen.events.push(event.type),
        onTranscript: (delta) => { seen.transcript += delta; },
        onUsage: (usage) => seen.usage.push(usage),
        onClosed: (closed) => { seen.closed = closed; },
    });
    window.voiceSession = session;
    window.voiceSeen = seen;
    // Enough ticks for two transcript words and two usage reports (at most 5 s).
    const started = performance.now();
    while (performance.now() - started < 5000 && !(seen.transcript.startsWith("Hello from")
           && seen.usage.length >= 2 && performance.now() - started >= tickWaitMs)) {
        await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return { id: session.id, audio: await session.audioStats(), ...seen };
}""".replace("%KEY%", KEY)


@pytest.fixture(scope="module")
async def chromium() -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), "install Debian's chromium (make browser)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        await browser.close()


@pytest.fixture
async def page_context(
    chromium: Browser, fake_upstream: FakeUpstream
) -> AsyncIterator[BrowserContext]:
    fake_upstream.behave(voice_tick_ms=200)
    httpx.delete(f"{fake_upstream.url}/_fake/sessions")
    context = await chromium.new_context()

    async def serve(route: Route) -> None:
        path = route.request.url.removeprefix(ORIGIN)
        if path == "/":
            await route.fulfill(body=BLANK_PAGE, content_type="text/html")
        elif path == "/keyveil.js":
            await route.fulfill(path=ASSETS / "keyveil.js", content_type="text/javascript")
        elif path.startswith("/v1/"):
            forwarded = await route.fetch(url=fake_upstream.url + path)
            await route.fulfill(response=forwarded)
        else:
            await route.fulfill(status=404)

    await context.route(f"{ORIGIN}/**", serve)
    yield context
    await context.close()
    fake_upstream.behave()


def fake_session(fake: FakeUpstream, session_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{fake.url}/_fake/sessions/{session_id}").json())


async def test_connect_voice_live_gets_audio_transcript_usage_and_stops(
    page_context: BrowserContext, fake_upstream: FakeUpstream
) -> None:
    page = await page_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{ORIGIN}/")
    seen = await page.evaluate(START, {"api": "live", "tickWaitMs": 1200})
    assert seen["id"].startswith("sess_")
    assert seen["events"][0] == "session.started"
    assert seen["audio"]["packets"] > 10, seen["audio"]
    assert seen["transcript"].startswith("Hello from")
    assert seen["usage"][-1]["seconds"] >= 2
    state = fake_session(fake_upstream, seen["id"])
    assert state["authorization"] == f"Bearer {KEY}"
    assert state["session"]["audio"] == {"output": {"voice": "marin"}}
    assert state["audio_frames_received"] > 0  # Chromium's fake microphone reached the fake

    closed = await page.evaluate("async () => await window.voiceSession.stop()")
    assert closed["reason"] == "close_requested"
    assert closed["usage"]["seconds"] >= seen["usage"][-1]["seconds"]
    state = fake_session(fake_upstream, seen["id"])
    assert state["state"] == "closed"
    assert state["reason"] == "close_requested"
    assert errors == []


async def test_connect_voice_realtime_call_ends_when_the_provider_hangs_up(
    page_context: BrowserContext, fake_upstream: FakeUpstream
) -> None:
    page = await page_context.new_page()
    await page.goto(f"{ORIGIN}/")
    seen = await page.evaluate(START, {"api": "realtime", "tickWaitMs": 800})
    assert seen["id"].startswith("rtc_")
    assert seen["events"][0] == "session.created"
    assert seen["audio"]["packets"] > 10, seen["audio"]
    assert seen["usage"][-1]["total_tokens"] >= 50
    assert fake_session(fake_upstream, seen["id"])["session"]["type"] == "realtime"

    response = httpx.post(
        f"{fake_upstream.base_url}/realtime/calls/{seen['id']}/hangup",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200
    closed = None
    for _ in range(40):  # the browser must notice within 2 s
        closed = await page.evaluate("() => window.voiceSeen.closed")
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed is not None, "the browser never saw the call end"
    assert closed["reason"] in ("remote_hangup", "connection_lost")
