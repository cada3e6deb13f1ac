"""The demo page and keyveil.js in headless Chromium against the running system.

The page is served by the token service at the allowed origin http://localhost:5173:
Chromium's --host-resolver-rules sends that origin to the token service's real port,
so the page, the module and the token request travel over real HTTP, and every proxy
call is a real cross-origin request with a CORS preflight. Nothing the page receives
may contain the provider key.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Response, async_playwright

from tests.stack import ORIGIN, Stack
from tests.support import TEST_PROVIDER_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FOREIGN_ORIGIN = "http://foreign.localhost:5174"


@pytest.fixture(scope="module")
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), "install Debian's chromium (make browser)"
    token = urlsplit(stack.url("token")).netloc
    rules = ", ".join(f"MAP {urlsplit(o).netloc} {token}" for o in (ORIGIN, FOREIGN_ORIGIN))
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, f"--host-resolver-rules={rules}"],
            headless=True,
        )
        yield chromium
        await chromium.close()


def behave(stack: Stack, **behaviour: Any) -> None:
    fake = stack.info["fake_upstream_url"]
    httpx.post(f"{fake}/_fake/behaviour", json=behaviour).raise_for_status()


async def first_text_while_streaming(page: Page, timeout_s: float = 10.0) -> str:
    """The answer's text the first time it is non-empty, checked to be mid-stream."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = await page.text_content("#answer") or ""
        state = await page.get_attribute("body", "data-state")
        if text:
            assert state == "streaming", state
            return text
        await asyncio.sleep(0.02)
    raise TimeoutError("no streamed text appeared")


async def test_demo_page_streams_chat_and_plays_speech_without_the_provider_key(
    stack: Stack, browser: Browser
) -> None:
    behave(stack, stream_chunks=5, chunk_delay_ms=250)
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    received: list[Response] = []
    page.on("response", lambda response: received.append(response))
    try:
        await page.goto(f"{ORIGIN}/demo/")
        assert await page.title() == "keyveil demo"
        await page.click("#send")

        # Text appears while the answer is still streaming (chunks are 250 ms apart).
        # (Waits use selectors and polling: the page's CSP forbids eval, which
        # Playwright's wait_for_function needs.)
        await page.wait_for_selector('body[data-state="streaming"]')
        partial = await first_text_while_streaming(page)
        await page.wait_for_selector(
            'body[data-state="done"], body[data-state="error"]', state="attached", timeout=30_000
        )
        status = await page.text_content("#status")
        assert await page.get_attribute("body", "data-state") == "done", (status, errors)
        answer = await page.text_content("#answer")
        assert answer == "Hello from the fake stream"
        assert partial is not None
        assert len(partial) < len(answer)
        assert "proxy token" in (await page.text_content("#token-status") or "")

        # The TTS audio element plays a blob holding the provider's audio bytes.
        src = await page.get_attribute("#audio", "src")
        assert src is not None
        assert src.startswith("blob:")
        speech = [r for r in received if r.url.endswith("/audio/speech")]
        assert len(speech) == 1
        assert speech[0].headers["content-type"] == "audio/mpeg"
        # The <audio> element loads the blob: the provider's audio bytes, relayed.
        deadline = time.monotonic() + 10
        while not (loaded := [r for r in received if r.url == src]):
            assert time.monotonic() < deadline, "the audio element never loaded its blob"
            await asyncio.sleep(0.05)
        audio = await loaded[0].body()
        assert audio.startswith(b"ID3")
        assert len(audio) > 1000

        # Every answer the page received, token and proxy alike: no provider key.
        proxy = stack.url("proxy")
        from_proxy = [r for r in received if r.url.startswith(proxy)]
        assert {urlsplit(r.url).path.rsplit("/", 2)[-1] for r in from_proxy} >= {
            "completions",
            "speech",
        }
        for response in from_proxy:
            assert response.status == 200
            assert response.headers.get("access-control-allow-origin") == ORIGIN
        assert any(r.url.endswith("/api/voice-agent/secure-token") for r in received)
        for response in received:
            body = await response.body()
            assert TEST_PROVIDER_KEY.encode() not in body, response.url
            assert TEST_PROVIDER_KEY not in str(await response.all_headers()), response.url
        assert errors == []
    finally:
        behave(stack)
        await context.close()


async def test_a_foreign_origin_gets_no_token_and_cannot_read_from_the_proxy(
    stack: Stack, browser: Browser
) -> None:
    """CORS is real: the same page at an origin not in ALLOWED_ORIGINS is refused."""
    context = await browser.new_context()
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    try:
        await page.goto(f"{FOREIGN_ORIGIN}/demo/")
        outcome = await page.evaluate(
            """async (proxy) => {
                const token = await fetch("/api/voice-agent/secure-token", {
                    method: "POST",
                    headers: { "Content-Type": "application/json" },
                    body: JSON.stringify({ mode: "proxy" }),
                });
                let proxyOutcome = "readable";
                try {
                    await fetch(proxy, {
                        method: "POST",
                        headers: { "Content-Type": "application/json", Authorization: "Bearer x" },
                        body: "{}",
                    });
                } catch (error) {
                    proxyOutcome = error.name;
                }
                return { tokenStatus: token.status, token: await token.json(), proxyOutcome };
            }""",
            f"{stack.url('proxy')}/api/voice-agent/proxy/v1/chat/completions",
        )
    finally:
        await context.close()
    assert outcome["tokenStatus"] == 403
    assert outcome["token"]["error"]["code"] == "origin_forbidden"
    assert outcome["proxyOutcome"] == "TypeError"
    assert any("CORS policy" in line for line in console), console
