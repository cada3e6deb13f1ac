"""The demo page as a voice agent in headless Chromium, through keyveil, against the fake.

Chromium's fake microphone goes into a real WebRTC session: the page signs its SDP
offer to the proxy's broker, which adds the pinned policy and the leased key and posts
it to the fake provider; the fake's aiortc peer answers, sends a tone and speaks the
data-channel events. `keyveil tokens revoke` must cut the session off within 2 s (the
broker's sideband closes it upstream; the browser sees its peer go). Nothing the page
receives may contain the provider key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Response, async_playwright

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.stack import ORIGIN, Stack
from tests.support import REPO, TEST_PROVIDER_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VOICE_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    # The fake provider's peer offers only 127.0.0.1 candidates.
    "--allow-loopback-in-peer-connection",
]
CUT_OFF_S = 2.0


@pytest.fixture(scope="module")
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    token = urlsplit(stack.url("token")).netloc
    rules = f"MAP {urlsplit(ORIGIN).netloc} {token}"
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, *VOICE_ARGS, f"--host-resolver-rules={rules}"],
            headless=True,
        )
        yield chromium
        await chromium.close()


def fake(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    response = httpx.request(method, f"{stack.info['fake_upstream_url']}{path}", **kwargs)
    response.raise_for_status()
    return response


async def number(page: Page, selector: str) -> float:
    return float((await page.text_content(selector)) or 0)


async def until(page: Page, what: str, check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            status = await page.text_content("#voice-status")
            error = await page.text_content("#voice-error")
            raise TimeoutError(f"{what} (status {status!r}, error {error!r})")
        await asyncio.sleep(0.05)


def revoke(stack: Stack, token_id: str) -> None:
    cli = [sys.executable, "-m", "keyveil.cli", "--state-dir", str(stack.state_dir)]
    subprocess.run(
        # "--": a token id may begin with "-" (base64url), which argparse reads as an option.
        [*cli, "tokens", "revoke", "--reason", "voice e2e", "--", token_id],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=30,
    )


async def talk_then_revoke(stack: Stack, browser: Browser, api: str) -> dict[str, Any]:
    """Start a voice session from the demo page, check it is live, revoke its token."""
    fake(stack, "POST", "/_fake/behaviour", json={"voice_tick_ms": 200})
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    received: list[Response] = []
    page.on("response", lambda response: received.append(response))
    try:
        await page.goto(f"{ORIGIN}/demo/")
        await page.select_option("#voice-api", api)
        await page.click("#talk")
        await page.wait_for_selector('#voice[data-state="live"]', timeout=20_000)

        async def audio_and_events() -> bool:
            usage = "#voice-seconds" if api == "live" else "#voice-tokens"
            return (
                await number(page, "#voice-packets") > 10
                and ((await page.text_content("#transcript")) or "").startswith("Hello from")
                and await number(page, usage) > 0
            )

        await until(page, "no audio, transcript or usage", audio_and_events)

        tokens = [r for r in received if r.url.endswith("/api/voice-agent/secure-token")]
        token_id = (await tokens[-1].json())["token_id"]
        sessions = fake(stack, "GET", "/_fake/sessions").json()["sessions"]
        live = [s for s in sessions if s["api"] == api and s["state"] == "open"]
        assert len(live) == 1, sessions
        upstream = live[0]
        assert upstream["authorization"] == f"Bearer {TEST_PROVIDER_KEY}"
        assert upstream["audio_frames_received"] > 0  # Chromium's microphone reached it

        revoke(stack, token_id)
        revoked_at = time.monotonic()

        async def cut_off() -> bool:
            return await page.get_attribute("#voice", "data-state") == "closed"

        await until(page, "the session outlived its token", cut_off, timeout_s=CUT_OFF_S)
        cut_after = time.monotonic() - revoked_at
        assert cut_after <= CUT_OFF_S
        ended = fake(stack, "GET", f"/_fake/sessions/{upstream['id']}").json()
        assert ended["state"] == "closed"

        voice_calls = [
            r for r in received if "/live/sessions" in r.url or "/realtime/calls" in r.url
        ]
        assert [r.status for r in voice_calls if r.request.method == "POST"] == [201]
        for response in received:
            body = await response.body()
            assert TEST_PROVIDER_KEY.encode() not in body, response.url
            assert TEST_PROVIDER_KEY not in str(await response.all_headers()), response.url
        assert errors == []
        return {"upstream": ended, "cut_after": cut_after}
    finally:
        fake(stack, "POST", "/_fake/behaviour", json={})
        await context.close()


async def test_demo_page_talks_to_gpt_live_and_is_cut_off_by_revocation(
    stack: Stack, browser: Browser
) -> None:
    outcome = await talk_then_revoke(stack, browser, "live")
    assert outcome["upstream"]["reason"] == "close_requested"
    assert outcome["upstream"]["seconds"] > 0


async def test_demo_page_makes_a_realtime_call_and_is_cut_off_by_revocation(
    stack: Stack, browser: Browser
) -> None:
    outcome = await talk_then_revoke(stack, browser, "realtime")
    assert outcome["upstream"]["reason"] == "close_requested"
    assert outcome["upstream"]["tokens"]["total_tokens"] > 0


async def test_demo_page_says_clearly_when_the_session_is_refused(
    stack: Stack, browser: Browser
) -> None:
    fake(stack, "POST", "/_fake/behaviour", json={"fail_status": 503})
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(f"{ORIGIN}/demo/")
        await page.click("#talk")
        await page.wait_for_selector('#voice[data-state="error"]', timeout=20_000)
        error = await page.text_content("#voice-error") or ""
        assert error.startswith("refused (502 upstream_"), error
        assert TEST_PROVIDER_KEY not in error
    finally:
        fake(stack, "POST", "/_fake/behaviour", json={})
        await context.close()
