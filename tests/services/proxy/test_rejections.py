"""Every contract rule refused as specified: a stable JSON error, nothing upstream."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms
from http_message_signatures.structures import CaseInsensitiveDict

from shared.signing import content_digest
from shared.tokens import Scope, TokenKeyring, revoked_key
from tests.support import FakeUpstream

from .conftest import CHAT, ORIGIN, PREFIX, SPEECH, STT, Browser, chat_body, multipart

OTHER_KEY = "other-psk-Zx8Cv6Bn4Mq2Wl0Ek9Rj7Tg5Yh3Uf1Id"


@dataclass
class Case:
    status: int
    code: str
    send: Callable[[Browser], Any]


def _headers(browser: Browser, **kw: Any) -> dict[str, str]:
    return browser.signed_headers(browser.token(), CHAT, chat_body(), **kw)


async def _post(
    browser: Browser, headers: dict[str, str], body: bytes | None = None, path: str = CHAT
) -> httpx.Response:
    return await browser.http.post(
        path, content=chat_body() if body is None else body, headers=headers
    )


def _without(name: str) -> Callable[[Browser], Any]:
    def send(browser: Browser) -> Any:
        headers = _headers(browser)
        headers.pop(name)
        return _post(browser, headers)

    return send


def _with(**changes: str) -> Callable[[Browser], Any]:
    def send(browser: Browser) -> Any:
        headers = _headers(browser)
        headers.update({k.replace("_", "-"): v for k, v in changes.items()})
        return _post(browser, headers)

    return send


def _signed(**sign: Any) -> Callable[[Browser], Any]:
    return lambda browser: _post(browser, _headers(browser, **sign))


def _signed_at(offset_s: int) -> Callable[[Browser], Any]:
    """Signed with `created` this far from the moment the request is sent (not collected)."""
    return lambda browser: _post(browser, _headers(browser, created=int(time.time()) + offset_s))


def _token(**token: Any) -> Callable[[Browser], Any]:
    def send(browser: Browser) -> Any:
        return _post(browser, browser.signed_headers(browser.token(**token), CHAT, chat_body()))

    return send


def _body(body: bytes, **kw: Any) -> Callable[[Browser], Any]:
    def send(browser: Browser) -> Any:
        path = kw.pop("path", CHAT)
        headers = browser.signed_headers(browser.token(), path, body, **kw)
        return _post(browser, headers, body, path)

    return send


def _tampered_body(browser: Browser) -> Any:
    headers = _headers(browser)
    return _post(browser, headers, chat_body(extra="tampered"))


def _unsigned_digest(browser: Browser) -> Any:
    headers = _headers(browser, components=["@method", "@path"])
    return _post(browser, headers)


def _other_path(browser: Browser) -> Any:
    headers = browser.signed_headers(browser.token(), SPEECH, chat_body())
    return _post(browser, headers)  # signed for /audio/speech, sent to /chat/completions


def _unknown_path(path: str) -> Callable[[Browser], Any]:
    def send(browser: Browser) -> Any:
        return _post(browser, browser.signed_headers(browser.token(), path, chat_body()), path=path)

    return send


def _get(browser: Browser) -> Any:
    return browser.http.get(CHAT, headers=_headers(browser))


_NO_FILE = multipart(None)

CASES = {
    "no authorization": Case(401, "token_missing", _without("Authorization")),
    "not bearer": Case(401, "token_missing", _with(Authorization="Basic abc")),
    "garbage token": Case(401, "token_invalid", _with(Authorization="Bearer not.a.jwt")),
    "two bearer values": Case(
        401, "token_invalid", _with(Authorization="Bearer a.b.c, Bearer sk-injected")
    ),
    "token from another signing key": Case(
        401, "token_invalid", _token(keyring=TokenKeyring(OTHER_KEY))
    ),
    "expired token": Case(401, "token_expired", _token(ttl=-5)),
    "scope": Case(403, "scope_denied", _token(scopes=(Scope.speech,))),
    "origin mismatch": Case(403, "origin_mismatch", _with(Origin="https://evil.example.com")),
    "token without origin, origin not allowed": Case(
        403,
        "origin_mismatch",
        lambda b: _post(
            b,
            b.signed_headers(
                b.token(origin=None), CHAT, chat_body(), origin="https://evil.example.com"
            ),
        ),
    ),
    "no signature": Case(401, "signature_missing", _without("Signature")),
    "no signature-input": Case(401, "signature_missing", _without("Signature-Input")),
    "malformed signature-input": Case(
        400, "signature_malformed", _with(Signature_Input='sig1=("@method" "@path"')
    ),
    "signature not bytes": Case(400, "signature_malformed", _with(Signature='sig1="abc"')),
    "wrong signing key": Case(401, "signature_invalid", _signed(key=b"0" * 32)),
    "keyid is not the token id": Case(401, "signature_unknown_key", _signed(keyid="someone")),
    "created too old": Case(401, "signature_expired", _signed_at(-120)),
    "created in the future": Case(401, "signature_future", _signed_at(120)),
    "no content-digest": Case(400, "digest_missing", _without("Content-Digest")),
    "digest not covered": Case(400, "signature_incomplete", _unsigned_digest),
    "path not covered": Case(
        400, "signature_incomplete", _signed(components=["@method", "content-digest"])
    ),
    "wrong digest": Case(400, "digest_mismatch", _tampered_body),
    "signed for another path": Case(401, "signature_invalid", _other_path),
    "invalid json": Case(400, "invalid_json", _body(b"{not json")),
    "json not an object": Case(400, "invalid_json", _body(b"[1, 2]")),
    "wrong content type": Case(
        415, "unsupported_media_type", _body(b"{}", content_type="text/plain")
    ),
    "oversized json": Case(
        413, "payload_too_large", _body(b'{"a":"' + b"x" * (5 * 1024 * 1024) + b'"}')
    ),
    "multipart without a file": Case(
        400, "file_missing", _body(*_NO_FILE[:1], path=STT, content_type=_NO_FILE[1])
    ),
    "not multipart": Case(415, "unsupported_media_type", _body(b"{}", path=STT)),
    "unknown path": Case(404, "not_found", _unknown_path(f"{PREFIX}/embeddings")),
    "path traversal": Case(404, "not_found", _unknown_path(f"{PREFIX}/chat/../models")),
    "GET": Case(405, "method_not_allowed", _get),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_refused(name: str, browser: Browser, upstream: FakeUpstream) -> None:
    case = CASES[name]
    response = await case.send(browser)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == case.code
    assert upstream.calls() == []


async def test_multipart_with_a_boundary_mismatch_digest(
    browser: Browser, upstream: FakeUpstream
) -> None:
    body, content_type = multipart(b"\x00" * 1000)
    headers = browser.signed_headers(browser.token(), STT, body, content_type=content_type)
    response = await browser.http.post(STT, content=body.replace(b"\x00", b"\x01"), headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "digest_mismatch"
    assert upstream.calls() == []


async def test_replay_is_refused(browser: Browser, upstream: FakeUpstream) -> None:
    headers = _headers(browser)
    first = await _post(browser, headers)
    assert first.status_code == 200
    replay = await _post(browser, headers)
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "replay_detected"
    assert len(upstream.calls()) == 1


async def test_revoked_token_is_refused(
    browser: Browser, upstream: FakeUpstream, redis_client: aioredis.Redis
) -> None:
    token = browser.token()
    assert (await browser.post(CHAT, chat_body(), token)).status_code == 200
    await redis_client.set(revoked_key(token.claims.jti), "1", ex=60)
    response = await browser.post(CHAT, chat_body(), token)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_revoked"
    assert len(upstream.calls()) == 1


async def test_rate_limit_per_token(browser: Browser, upstream: FakeUpstream) -> None:
    token = browser.token()
    statuses = [(await browser.post(CHAT, chat_body(), token)).status_code for _ in range(5)]
    assert statuses == [200] * 5
    limited = await browser.post(CHAT, chat_body(), token)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit"].startswith('"per-token";r=0')
    assert len(upstream.calls()) == 5
    # Another token is not affected.
    assert (await browser.post(CHAT, chat_body())).status_code == 200


async def test_independent_implementation_is_accepted(
    browser: Browser, upstream: FakeUpstream
) -> None:
    token = browser.token()
    body = chat_body()

    @dataclass
    class Message:
        method: str
        url: str
        headers: CaseInsensitiveDict

    message = Message("POST", f"{browser.base_url}{CHAT}", CaseInsensitiveDict())
    message.headers["Content-Type"] = "application/json"
    message.headers["Authorization"] = f"Bearer {token.value}"
    message.headers["Origin"] = ORIGIN
    resolver = MappingKeyResolver(
        public_keys={}, private_keys={token.claims.jti: token.signing_key}
    )
    HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=resolver).sign(
        message,
        key_id=token.claims.jti,
        nonce="independent-nonce-1",
        covered_component_ids=("@method", "@authority", "@target-uri", "@path", "content-type"),
        body=body,
    )
    assert message.headers["Content-Digest"] == content_digest(body)
    response = await browser.http.post(CHAT, content=body, headers=dict(message.headers.items()))
    assert response.status_code == 200, response.text
    # Covered extras are verified: the same signature from another authority fails.
    moved = dict(message.headers.items())
    moved["Host"] = "evil.example.com"
    moved["Signature-Input"] = moved["Signature-Input"].replace("independent-nonce-1", "n2n2n2n2n2")
    response = await browser.http.post(CHAT, content=body, headers=moved)
    assert response.status_code == 401
    assert len(upstream.calls()) == 1


async def test_cors(browser: Browser) -> None:
    preflight = await browser.http.options(
        CHAT,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, content-digest, "
            "signature, signature-input",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-methods"] == "POST"
    allowed = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert {
        "authorization",
        "content-type",
        "content-digest",
        "signature",
        "signature-input",
    } <= allowed
    evil = await browser.http.options(
        CHAT,
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in evil.headers
    response = await browser.post(CHAT, chat_body())
    assert response.headers["access-control-allow-origin"] == ORIGIN
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "ratelimit" in exposed
    assert "retry-after" in exposed


async def test_failures_are_counted_without_ip_or_token_labels(browser: Browser) -> None:
    await _without("Signature")(browser)
    metrics = (await browser.http.get("/metrics")).text
    assert 'keyveil_proxy_rejections_total{reason="auth"}' in metrics
    assert 'keyveil_auth_failures_total{reason="auth",service="proxy"}' in metrics
    assert "127.0.0.1" not in metrics


def test_cases_are_json_serialisable() -> None:
    assert orjson.dumps(sorted(CASES))
