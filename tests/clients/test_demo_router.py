"""The demo page is served only in development or demo mode, under a strict CSP."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from services.token.demo import ASSETS, demo_router
from services.token.settings import Settings
from tests.support import TEST_PROXY_SIGNING_KEY


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "PROXY_PUBLIC_URL": "https://proxy.keyveil.test/api/voice-agent/proxy/v1",
        "ALLOWED_ORIGINS": "https://app.keyveil.test",
        "KEYVEIL_ALLOW_ANONYMOUS": True,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://token.test") as client:
        return await client.get(path)


def test_not_served_in_production_without_demo_mode() -> None:
    assert demo_router(settings(NODE_ENV="production")) is None
    assert demo_router(settings(NODE_ENV="staging")) is None


@pytest.mark.parametrize(
    "overrides",
    [{"NODE_ENV": "development"}, {"NODE_ENV": "staging", "VOICE_AGENT_DEMO_MODE": "true"}],
)
async def test_page_and_module_are_served(overrides: dict[str, object]) -> None:
    router = demo_router(settings(**overrides))
    assert router is not None
    app = FastAPI()
    app.include_router(router)
    page = await get(app, "/demo/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == (ASSETS / "demo.html").read_text()
    module = await get(app, "/demo/keyveil.js")
    assert module.headers["content-type"].startswith("text/javascript")
    assert "export class KeyveilClient" in module.text
    assert (await get(app, "/demo")).status_code == 308


async def test_csp_allows_only_the_inline_script_self_and_the_proxy() -> None:
    router = demo_router(settings(NODE_ENV="development"))
    assert router is not None
    app = FastAPI()
    app.include_router(router)
    page = await get(app, "/demo/")
    csp = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    inline = re.search(r'<script type="module">(.*?)</script>', page.text, re.DOTALL)
    assert inline is not None
    digest = base64.b64encode(hashlib.sha256(inline.group(1).encode()).digest()).decode()
    assert csp["script-src"] == f"'self' 'sha256-{digest}'"
    assert csp["connect-src"] == "'self' https://proxy.keyveil.test"
    assert csp["default-src"] == "'none'"
    assert csp["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"


def test_missing_assets_disable_the_demo(tmp_path: Path) -> None:
    assert demo_router(settings(NODE_ENV="development"), assets=tmp_path) is None
