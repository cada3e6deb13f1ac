"""The shared HTTP edge: client IP behind proxies, JSON errors, capped bodies."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from shared.errors import ForbiddenError
from shared.httpedge import (
    add_edge_routes,
    client_ip,
    install_error_handlers,
    parse_networks,
    read_body_capped,
)

TRUSTED = parse_networks(["10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # untrusted peer: header ignored
        ("10.0.0.5", "198.51.100.7", "198.51.100.7"),  # one trusted hop
        ("10.0.0.5", "6.6.6.6, 198.51.100.7, 10.1.1.1", "198.51.100.7"),  # spoofed left part
        ("10.0.0.5", "not-an-ip, 198.51.100.7", "198.51.100.7"),
        ("10.0.0.5", "garbage", "10.0.0.5"),
        ("10.0.0.5", None, "10.0.0.5"),
        (None, "1.2.3.4", "unknown"),
    ],
)
def test_client_ip(peer: str | None, xff: str | None, expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_ip("10.0.0.5", "198.51.100.7", []) == "10.0.0.5"


class Body(BaseModel):
    count: int


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    async def always_ready() -> bool:
        return True

    async def never_ready() -> bool:
        raise ConnectionError("down")

    add_edge_routes(app, {"nats": always_ready, "redis": never_ready})

    @app.post("/typed")
    async def typed(body: Body) -> dict[str, int]:
        return {"count": body.count}

    @app.post("/capped")
    async def capped(request: Request) -> dict[str, int]:
        return {"size": len(await read_body_capped(request, 16))}

    @app.get("/forbidden")
    async def forbidden() -> None:
        raise ForbiddenError("origin not allowed", code="origin_not_allowed")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret-internal-detail")

    return app


async def test_errors_are_json_with_stable_codes() -> None:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        invalid = await client.post("/typed", json={"count": "s3cret-input"})
        assert invalid.status_code == 400
        assert invalid.json()["error"]["code"] == "invalid_request"
        assert "s3cret-input" not in invalid.text

        malformed = await client.post(
            "/typed", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 400

        too_big = await client.post("/capped", content=b"x" * 17)
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        assert (await client.post("/capped", content=b"x" * 16)).json() == {"size": 16}

        forbidden = await client.get("/forbidden")
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "origin_not_allowed"

        missing = await client.get("/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"

        boom = await client.get("/boom")
        assert boom.status_code == 500
        assert boom.json() == {"error": {"code": "internal_error", "message": "internal error"}}
        assert "secret-internal-detail" not in boom.text
        assert "Traceback" not in boom.text


async def test_readiness_reports_each_dependency() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"nats": True, "redis": False}
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert b"keyveil_events" in metrics.content or b"python_info" in metrics.content
