"""The SDK's request signing is what the proxy verifies (shared.signing.verify_request)."""

from __future__ import annotations

import time

import httpx
import pytest

from keyveil.client import ClientError, Token, sign_proxy_request
from shared.signing import DigestError, SignatureError, verify_request

KEY = b"k" * 32


def proxy_token(**overrides: object) -> Token:
    fields: dict[str, object] = {
        "mode": "proxy",
        "token": "tok.en.value",
        "expires_at": time.time() + 300,
        "lifetime_s": 300.0,
        "obtained_at": time.monotonic(),
        "token_id": "tid-123",
        "signing_key": KEY,
    }
    fields.update(overrides)
    return Token(**fields)  # type: ignore[arg-type]


def verify(request: httpx.Request, *, body: bytes | None = None, key: bytes = KEY) -> str:
    raw_path, _, raw_query = request.url.raw_path.partition(b"?")
    verified = verify_request(
        method=request.method,
        path=raw_path.decode(),
        query=raw_query.decode(),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=request.content if body is None else body,
        key_for=lambda keyid: key,
        now=time.time(),
        window_s=60,
        require_digest=True,
    )
    return verified.keyid


def test_signed_json_request_verifies_and_carries_token_and_origin() -> None:
    request = httpx.Request(
        "POST",
        "http://proxy.test:8081/api/voice-agent/proxy/v1/chat/completions",
        json={"model": "m", "messages": []},
    )
    sign_proxy_request(request, proxy_token(), origin="https://app.test")
    assert verify(request) == "tid-123"
    assert request.headers["authorization"] == "Bearer tok.en.value"
    assert request.headers["origin"] == "https://app.test"
    assert request.headers["content-digest"].startswith("sha-256=:")


def test_multipart_body_is_covered_by_the_digest() -> None:
    request = httpx.Request(
        "POST",
        "http://proxy.test/api/voice-agent/proxy/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("a.webm", b"\x00\x01audio")},
    )
    request.read()
    sign_proxy_request(request, proxy_token())
    assert verify(request) == "tid-123"
    with pytest.raises(DigestError):
        verify(request, body=request.content + b"tampered")


def test_resigning_replaces_the_old_signature_with_a_fresh_nonce() -> None:
    request = httpx.Request(
        "POST", "http://proxy.test/api/voice-agent/proxy/v1/audio/speech", json={}
    )
    sign_proxy_request(request, proxy_token())
    first = request.headers["signature-input"]
    sign_proxy_request(request, proxy_token(token_id="tid-456"))
    assert request.headers["signature-input"] != first
    assert len(request.headers.get_list("signature")) == 1
    assert verify(request) == "tid-456"


def test_a_wrong_key_does_not_verify() -> None:
    request = httpx.Request(
        "POST", "http://proxy.test/api/voice-agent/proxy/v1/audio/speech", json={}
    )
    sign_proxy_request(request, proxy_token())
    with pytest.raises(SignatureError):
        verify(request, key=b"x" * 32)


def test_a_token_without_a_signing_key_refuses_to_sign() -> None:
    request = httpx.Request("POST", "http://proxy.test/x", json={})
    with pytest.raises(ClientError, match="realtime"):
        sign_proxy_request(request, proxy_token(mode="realtime", signing_key=None, token_id=None))
