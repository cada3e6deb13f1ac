"""Token parsing, expiry arithmetic and the refresh margin."""

from __future__ import annotations

import base64

import pytest

from keyveil.client import ClientError, Token
from keyveil.client.tokens import TokenSource, proxy_root

ANSWER = {
    "mode": "proxy",
    "token": "t.o.k",
    "token_id": "tid",
    "signing_key": base64.urlsafe_b64encode(b"s" * 32).rstrip(b"=").decode(),
    "expires_at": 1_000_300,
    "proxy_url": "http://proxy:8081",
    "scopes": ["chat/completions"],
}


def test_proxy_answer_is_parsed_with_a_decoded_key_and_lifetime() -> None:
    token = Token.from_answer(ANSWER, server_now=1_000_000, obtained_at=50.0)
    assert token.signing_key == b"s" * 32
    assert token.lifetime_s == 300
    assert token.can_sign
    assert token.scopes == ("chat/completions",)
    assert "t.o.k" not in repr(token)
    assert "sss" not in repr(token)


def test_realtime_answer_cannot_sign() -> None:
    answer = {"mode": "realtime", "token": "ek_1", "expires_at": 1_000_060, "session": {"a": 1}}
    token = Token.from_answer(answer, server_now=1_000_000, obtained_at=0.0)
    assert not token.can_sign
    assert token.session == {"a": 1}


def test_an_answer_without_a_token_is_an_error() -> None:
    with pytest.raises(ClientError):
        Token.from_answer({"mode": "proxy"}, server_now=0, obtained_at=0)


@pytest.mark.parametrize(
    ("lifetime", "elapsed", "margin", "refresh"),
    [
        (300, 0, 30, False),
        (300, 269, 30, False),
        (300, 271, 30, True),  # inside the 30 s margin
        (20, 15, 30, False),  # short tokens: margin is a fifth of the lifetime (4 s)
        (20, 17, 30, True),
    ],
)
def test_refresh_margin(lifetime: float, elapsed: float, margin: float, refresh: bool) -> None:
    answer = {**ANSWER, "expires_at": 1_000_000 + lifetime}
    token = Token.from_answer(answer, server_now=1_000_000, obtained_at=100.0)
    assert token.needs_refresh(100.0 + elapsed, margin) is refresh


def test_cache_serves_until_the_margin_and_invalidate_forgets() -> None:
    now = [100.0]
    source = TokenSource("http://token", clock=lambda: now[0])
    token = Token.from_answer(ANSWER, server_now=1_000_000, obtained_at=100.0)
    source.adopt(token)
    assert source.cached() is token
    now[0] = 100.0 + 280
    assert source.cached() is None
    now[0] = 100.0
    source.invalidate(Token.from_answer(ANSWER, server_now=1_000_000, obtained_at=1.0))
    assert source.cached() is token  # another token: the cached one stays
    source.invalidate(token)
    assert source.cached() is None


@pytest.mark.parametrize(
    "url",
    [
        "http://p:1",
        "http://p:1/",
        "http://p:1/api/voice-agent/proxy/v1",
        "http://p:1/api/voice-agent/proxy/v1/",
    ],
)
def test_proxy_root(url: str) -> None:
    assert proxy_root(url) == "http://p:1"


def test_token_url_accepts_base_or_full_path() -> None:
    assert TokenSource("http://t:1/").url == "http://t:1/api/voice-agent/secure-token"
    assert TokenSource("http://t:1/api/voice-agent/secure-token").url.endswith("/secure-token")
