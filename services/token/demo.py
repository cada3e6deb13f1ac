"""The browser demo page and the keyveil.js module, served under /demo/.

Only in development or demo mode (`demo_router` returns None otherwise). The page
gets a strict Content-Security-Policy: scripts only from this origin plus the
page's own inline module (by hash), network only to this origin and the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from services.token.settings import Settings
from shared.settings import Environment

__all__ = ["ASSETS", "DEMO_PREFIX", "content_security_policy", "demo_router"]

log = logging.getLogger(__name__)

DEMO_PREFIX = "/demo"
ASSETS = Path(__file__).resolve().parents[2] / "clients" / "browser"
_INLINE = re.compile(r"<(script|style)(?:\s[^>]*)?>(.*?)</\1>", re.DOTALL)
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(page: str, proxy_url: str) -> str:
    """A CSP allowing exactly the page's inline blocks, this origin and the proxy."""
    scripts = [_hash(body) for kind, body in _INLINE.findall(page) if kind == "script"]
    styles = [_hash(body) for kind, body in _INLINE.findall(page) if kind == "style"]
    parts = urlsplit(proxy_url)
    proxy_origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    return "; ".join(
        [
            "default-src 'none'",
            " ".join(["script-src 'self'", *scripts]),
            " ".join(["style-src", *styles]) if styles else "style-src 'none'",
            f"connect-src 'self' {proxy_origin}".rstrip(),
            "media-src blob:",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def demo_router(settings: Settings, assets: Path = ASSETS) -> APIRouter | None:
    """The /demo/ routes in development or demo mode, else None (nothing is served)."""
    if settings.node_env is not Environment.development and not settings.demo_mode:
        return None
    try:
        page = (assets / "demo.html").read_text(encoding="utf-8")
        module = (assets / "keyveil.js").read_text(encoding="utf-8")
    except OSError:
        log.warning("demo page assets not found; /demo/ is not served")
        return None
    page_headers = {
        **_COMMON_HEADERS,
        "Content-Security-Policy": content_security_policy(page, settings.proxy_public_url),
    }
    router = APIRouter(prefix=DEMO_PREFIX, include_in_schema=False)

    @router.get("")
    async def demo_root() -> Response:
        return RedirectResponse(f"{DEMO_PREFIX}/", status_code=308)

    @router.get("/")
    async def demo_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    @router.get("/keyveil.js")
    async def demo_module() -> Response:
        return Response(
            module, media_type="text/javascript; charset=utf-8", headers=_COMMON_HEADERS
        )

    return router
