"""The token service in process against real Redis, NATS and the fake upstream."""

from __future__ import annotations

import asyncio
import email.utils
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from keyveil.servers import free_port
from shared.crypto import b64url_decode
from shared.signing import sign_request
from shared.tokens import ProxyClaims, Scope, TokenKeyring, revoked_key
from tests.services.proxy.rawhttp import read_request
from tests.services.token.conftest import (
    ORIGIN,
    AppFactory,
    EventLog,
    browser,
    fresh_ip,
)
from tests.support import TEST_PROVIDER_KEY, TEST_PROXY_SIGNING_KEY, FakeUpstream, ServiceProcess

SECURE = "/api/voice-agent/secure-token"
LEGACY = "/api/voice-agent/token"


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _no_secret(text: str) -> None:
    assert TEST_PROVIDER_KEY not in text
    assert TEST_PROXY_SIGNING_KEY not in text
    assert "sk-" not in text


# --- modes -------------------------------------------------------------------------------


async def test_proxy_mode_issues_a_signed_token(token_app: AppFactory, events: EventLog) -> None:
    before = _metric("keyveil_token_issued_total", mode="proxy", result="ok")
    async with token_app() as client:
        answer = await client.post(SECURE, json={"mode": "proxy"}, headers=browser())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    _no_secret(answer.text)
    assert body["mode"] == "proxy"
    assert body["proxy_url"] == "https://proxy.example.test/api/voice-agent/proxy/v1"
    assert body["scopes"] == [s.value for s in Scope]
    keyring = TokenKeyring(TEST_PROXY_SIGNING_KEY)
    claims = keyring.verify(body["token"])
    assert claims.jti == body["token_id"]
    assert claims.origin == ORIGIN
    assert claims.exp == body["expires_at"]
    assert 115 <= claims.exp - time.time() <= 121
    assert b64url_decode(body["signing_key"]) == keyring.request_signing_key(
        body["token"], body["token_id"]
    )
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert answer.headers["ratelimit-policy"] == '"token_ip";q=1000;w=60'
    assert answer.headers["ratelimit"].startswith('"token_ip";r=999;')
    assert _metric("keyveil_token_issued_total", mode="proxy", result="ok") == before + 1
    event = await events.wait_for(type="token.issued", token_id=body["token_id"])
    assert (event["mode"], event["outcome"], event["service"]) == ("proxy", "ok", "token")


async def test_realtime_mode_mints_an_ephemeral_secret_with_the_leased_key(
    token_app: AppFactory, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.clear()
    async with token_app() as client:
        answer = await client.post(SECURE, json={"mode": "realtime"}, headers=browser())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    _no_secret(answer.text)
    assert body["mode"] == "realtime"
    assert body["token"].startswith("ek_")
    assert 115 <= body["expires_at"] - time.time() <= 121  # VOICE_AGENT_TOKEN_DURATION
    assert body["session"]["model"] == "gpt-realtime"
    assert body["session"]["audio"] == {"output": {"voice": "alloy"}}
    calls = [c for c in fake_upstream.calls() if c["path"] == "/v1/realtime/client_secrets"]
    assert [c["authorization"] for c in calls] == [f"Bearer {TEST_PROVIDER_KEY}"]


async def test_realtime_session_stays_inside_the_allowlists(
    token_app: AppFactory, fake_upstream: FakeUpstream
) -> None:
    async with token_app(REALTIME_MODELS="gpt-realtime,gpt-realtime-mini") as client:
        chosen = await client.post(
            SECURE,
            json={
                "mode": "realtime",
                "session": {"model": "gpt-realtime-mini", "voice": "verse", "tools": ["x"]},
            },
            headers=browser(),
        )
        assert chosen.status_code == 200, chosen.text
        assert chosen.json()["session"]["model"] == "gpt-realtime-mini"
        assert "tools" not in chosen.json()["session"]
        fake_upstream.clear()
        wider = await client.post(
            SECURE,
            json={"mode": "auto", "session": {"model": "gpt-4-expensive"}},
            headers=browser(),
        )
        voice = await client.post(SECURE, json={"session": {"voice": "darth"}}, headers=browser())
    assert (wider.status_code, wider.json()["error"]["code"]) == (403, "model_not_allowed")
    assert (voice.status_code, voice.json()["error"]["code"]) == (403, "voice_not_allowed")
    assert "gpt-4-expensive" not in wider.text
    assert fake_upstream.calls() == []


async def test_auto_prefers_realtime(token_app: AppFactory) -> None:
    async with token_app() as client:
        answer = await client.post(SECURE, json={}, headers=browser())
    assert answer.json()["mode"] == "realtime"
    assert "fallback_reason" not in answer.json()


async def test_auto_falls_back_to_proxy_when_the_upstream_fails(
    token_app: AppFactory, fake_upstream: FakeUpstream, events: EventLog
) -> None:
    fake_upstream.behave(fail_status=500)
    try:
        async with token_app() as client:
            auto = await client.post(SECURE, content=b"", headers=browser())
            realtime = await client.post(SECURE, json={"mode": "realtime"}, headers=browser())
    finally:
        fake_upstream.behave()
    assert auto.status_code == 200
    assert (auto.json()["mode"], auto.json()["fallback_reason"]) == ("proxy", "upstream_error")
    TokenKeyring(TEST_PROXY_SIGNING_KEY).verify(auto.json()["token"])
    assert realtime.status_code == 502
    assert realtime.json()["error"]["code"] == "upstream_error"
    _no_secret(realtime.text)
    event = await events.wait_for(type="token.issued", token_id=auto.json()["token_id"])
    assert event["reason"] == {"kind": "fallback", "code": "upstream_error", "category": "upstream"}


async def test_auto_falls_back_when_the_upstream_is_too_slow(
    token_app: AppFactory, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.behave(delay_ms=1500)
    try:
        async with token_app(TOKEN_UPSTREAM_TIMEOUT_S=0.3) as client:
            started = time.monotonic()
            auto = await client.post(SECURE, json={"mode": "auto"}, headers=browser())
            elapsed = time.monotonic() - started
    finally:
        fake_upstream.behave()
    assert auto.json()["fallback_reason"] == "upstream_timeout"
    assert elapsed < 1.4


async def test_auto_falls_back_when_no_key_manager_answers(
    token_app: AppFactory, key_manager: ServiceProcess
) -> None:
    key_manager.stop()
    try:
        async with token_app() as client:
            auto = await client.post(SECURE, json={}, headers=browser())
            realtime = await client.post(SECURE, json={"mode": "realtime"}, headers=browser())
    finally:
        key_manager.start()
    assert (auto.json()["mode"], auto.json()["fallback_reason"]) == ("proxy", "key_unavailable")
    assert (realtime.status_code, realtime.json()["error"]["code"]) == (503, "key_unavailable")


async def test_demo_mode_never_calls_the_upstream(
    token_app: AppFactory, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.clear()
    async with token_app(VOICE_AGENT_DEMO_MODE=True) as client:
        answers = [
            await client.post(SECURE, json={"mode": mode}, headers=browser())
            for mode in ("demo", "auto", "realtime", "proxy")
        ]
    assert [a.json()["mode"] for a in answers] == ["demo"] * 4
    assert fake_upstream.calls() == []
    TokenKeyring(TEST_PROXY_SIGNING_KEY).verify(answers[0].json()["token"])


async def test_demo_is_refused_when_demo_mode_is_off(token_app: AppFactory) -> None:
    async with token_app() as client:
        answer = await client.post(SECURE, json={"mode": "demo"}, headers=browser())
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "demo_disabled")


async def test_scopes_can_narrow_but_not_widen(token_app: AppFactory) -> None:
    async with token_app(PROXY_SCOPES="chat/completions,audio/speech") as client:
        narrow = await client.post(
            SECURE, json={"mode": "proxy", "scopes": ["audio/speech"]}, headers=browser()
        )
        wide = await client.post(
            SECURE,
            json={"mode": "proxy", "scopes": ["audio/transcriptions"]},
            headers=browser(),
        )
    assert narrow.json()["scopes"] == ["audio/speech"]
    claims = TokenKeyring(TEST_PROXY_SIGNING_KEY).verify(narrow.json()["token"])
    assert claims.scopes == [Scope.speech]
    assert (wide.status_code, wide.json()["error"]["code"]) == (400, "scope_not_allowed")


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"mode": "proxy", "marker-7f3a', "invalid_json"),
        (b'["marker-7f3a"]', "invalid_body"),
        (b'{"mode": "marker-7f3a"}', "unknown_mode"),
        (b'{"mode": 7}', "unknown_mode"),
        (b'{"session": "marker-7f3a"}', "invalid_request"),
        (b'{"session": {"model": 12}}', "invalid_request"),
        (b'{"scopes": "marker-7f3a"}', "invalid_request"),
        (b"\xff\xfe\x00marker-7f3a", "invalid_json"),
    ],
)
async def test_bad_bodies_get_stable_codes_without_echo(
    token_app: AppFactory, body: bytes, code: str
) -> None:
    async with token_app() as client:
        answer = await client.post(
            SECURE, content=body, headers={**browser(), "Content-Type": "application/json"}
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == code
    assert "marker-7f3a" not in answer.text


async def test_oversized_body_is_refused(token_app: AppFactory) -> None:
    async with token_app(TOKEN_MAX_BODY_BYTES=1024) as client:
        declared = await client.post(SECURE, content=b"{" + b" " * 4000 + b"}", headers=browser())

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 512

        streamed = await client.post(SECURE, content=chunks(), headers=browser())
    assert (declared.status_code, declared.json()["error"]["code"]) == (413, "payload_too_large")
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "payload_too_large")


# --- origin and CORS ---------------------------------------------------------------------


async def test_origin_rules(token_app: AppFactory, events: EventLog) -> None:
    async with token_app() as client:
        missing = await client.post(SECURE, json={}, headers=browser(origin=None))
        ip = fresh_ip()
        foreign = await client.post(
            SECURE, json={}, headers=browser(ip, origin="https://evil.example")
        )
        lookalike = await client.post(
            SECURE, json={}, headers=browser(origin=ORIGIN + ".evil.example")
        )
    assert (missing.status_code, missing.json()["error"]["code"]) == (403, "origin_required")
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (403, "origin_forbidden")
    assert lookalike.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers
    event = await events.wait_for(type="token.denied", client_ip=ip)
    assert (event["reason"]["code"], event["reason"]["category"], event["status"]) == (
        "origin_forbidden",
        "auth",
        403,
    )


async def test_preflight_lists_only_what_is_needed(token_app: AppFactory) -> None:
    async with token_app() as client:
        issue = await client.options(
            SECURE,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        revoke = await client.options(
            f"{SECURE}/abc",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"},
        )
        wrong_method = await client.options(
            SECURE, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"}
        )
        foreign = await client.options(
            SECURE,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
    assert issue.status_code == 204
    assert issue.headers["access-control-allow-origin"] == ORIGIN
    assert issue.headers["access-control-allow-methods"] == "POST"
    assert issue.headers["access-control-allow-headers"] == "Content-Type"
    assert "access-control-allow-credentials" not in issue.headers
    assert revoke.headers["access-control-allow-methods"] == "DELETE"
    assert "Signature-Input" in revoke.headers["access-control-allow-headers"]
    assert wrong_method.status_code == 403
    assert foreign.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers


# --- rate limits -------------------------------------------------------------------------


async def test_issuance_is_limited_per_client_ip(token_app: AppFactory, events: EventLog) -> None:
    ip, other = fresh_ip(), fresh_ip()
    async with token_app(VOICE_AGENT_RATE_LIMIT=3) as client:
        answers = [
            await client.post(SECURE, json={"mode": "proxy"}, headers=browser(ip)) for _ in range(4)
        ]
        neighbour = await client.post(SECURE, json={"mode": "proxy"}, headers=browser(other))
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["ratelimit-policy"] == '"token_ip";q=3;w=60'
    assert refused.headers["ratelimit"].startswith('"token_ip";r=0;')
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert neighbour.status_code == 200
    event = await events.wait_for(type="token.denied", client_ip=ip)
    assert (event["reason"]["code"], event["reason"]["category"], event["status"]) == (
        "rate_limited",
        "limit",
        429,
    )


async def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    token_app: AppFactory, redis_client: aioredis.Redis
) -> None:
    await redis_client.delete("kv:rl:token_ip:{127.0.0.1}")
    async with token_app(VOICE_AGENT_RATE_LIMIT=1, TRUSTED_PROXIES="") as client:
        first = await client.post(SECURE, json={"mode": "proxy"}, headers=browser())
        spoofed = await client.post(SECURE, json={"mode": "proxy"}, headers=browser())
    await redis_client.delete("kv:rl:token_ip:{127.0.0.1}")
    assert (first.status_code, spoofed.status_code) == (200, 429)


async def test_repeated_limit_hits_block_the_ip(token_app: AppFactory, events: EventLog) -> None:
    ip = fresh_ip()
    async with token_app(
        VOICE_AGENT_RATE_LIMIT=1, RATE_LIMIT_BLOCK_AFTER_STRIKES=2, RATE_LIMIT_BLOCK_FOR_S=120
    ) as client:
        codes = []
        for _ in range(4):
            answer = await client.post(SECURE, json={"mode": "proxy"}, headers=browser(ip))
            codes.append(answer.json().get("error", {}).get("code", "ok"))
    assert codes == ["ok", "rate_limited", "rate_limited", "ip_blocked"]
    assert 100 < int(answer.headers["retry-after"]) <= 120
    event = await events.wait_for(type="ip.blocked", client_ip=ip)
    assert event["outcome"] == "denied"


# --- legacy path -------------------------------------------------------------------------


async def test_legacy_path_answers_like_secure_token_with_deprecation_headers(
    token_app: AppFactory,
) -> None:
    before = _metric("keyveil_token_legacy_requests_total")
    async with token_app() as client:
        answer = await client.post(LEGACY, json={"mode": "proxy"}, headers=browser())
        refused = await client.post(LEGACY, json={"mode": "nope"}, headers=browser())
    assert answer.status_code == 200
    assert answer.json()["mode"] == "proxy"
    TokenKeyring(TEST_PROXY_SIGNING_KEY).verify(answer.json()["token"])
    _no_secret(answer.text)
    for response in (answer, refused):
        assert response.headers["deprecation"] == "@1767225600"
        sunset = email.utils.parsedate_to_datetime(response.headers["sunset"])
        assert sunset.timestamp() == 1798761600
        assert (
            response.headers["link"] == '</api/voice-agent/secure-token>; rel="successor-version"'
        )
    assert refused.json()["error"]["code"] == "unknown_mode"
    assert _metric("keyveil_token_legacy_requests_total") == before + 2


# --- revocation --------------------------------------------------------------------------


async def _proxy_token(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.post(SECURE, json={"mode": "proxy"}, headers=browser())
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def _signed_delete(
    token: dict[str, Any], *, key: bytes | None = None, path: str | None = None
) -> tuple[str, dict[str, str]]:
    path = path or f"{SECURE}/{token['token_id']}"
    headers = sign_request(
        method="DELETE",
        path=path,
        key=key or b64url_decode(token["signing_key"]),
        keyid=token["token_id"],
    )
    return path, {**headers, "Authorization": f"Bearer {token['token']}", **browser()}


async def test_holder_revokes_with_a_signed_delete(
    token_app: AppFactory, redis_client: aioredis.Redis, events: EventLog
) -> None:
    async with token_app() as client:
        token = await _proxy_token(client)
        path, headers = _signed_delete(token)
        answer = await client.delete(path, headers=headers)
        replay = await client.delete(path, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "revoked": True,
        "token_id": token["token_id"],
        "expires_at": token["expires_at"],
    }
    ttl = await redis_client.ttl(revoked_key(token["token_id"]))
    assert 100 <= ttl <= 121
    assert (replay.status_code, replay.json()["error"]["code"]) == (401, "replay_detected")
    audit = await events.wait_for(type="token.revoked", actor="token-holder")
    assert audit["detail"]["token_id"] == token["token_id"]


async def test_revocation_refuses_forged_mismatched_and_expired_tokens(
    token_app: AppFactory, redis_client: aioredis.Redis
) -> None:
    keyring = TokenKeyring(TEST_PROXY_SIGNING_KEY)
    async with token_app() as client:
        token = await _proxy_token(client)
        other = await _proxy_token(client)

        path, headers = _signed_delete(token, key=b"\x00" * 32)
        wrong_key = await client.delete(path, headers=headers)

        forged_token = {
            **token,
            "token": TokenKeyring("x" * 40 + "Zq9").issue(
                ProxyClaims(jti=token["token_id"], sid="s", scopes=[], iat=1, exp=2**31)
            ),
        }
        path, headers = _signed_delete(forged_token)
        forged = await client.delete(path, headers=headers)

        path, headers = _signed_delete(token, path=f"{SECURE}/{other['token_id']}")
        mismatch = await client.delete(path, headers=headers)

        now = int(time.time())
        stale = keyring.issue(
            ProxyClaims(jti="old-token", sid="s", scopes=[], iat=now - 600, exp=now - 300)
        )
        expired_token = {
            "token": stale,
            "token_id": "old-token",
            "signing_key": "",
        }
        path, headers = _signed_delete(
            expired_token, key=keyring.request_signing_key(stale, "old-token")
        )
        expired = await client.delete(path, headers=headers)

        unsigned = await client.delete(
            f"{SECURE}/{token['token_id']}",
            headers={"Authorization": f"Bearer {token['token']}", **browser()},
        )
        anonymous = await client.delete(f"{SECURE}/{token['token_id']}", headers=browser())
    assert (wrong_key.status_code, wrong_key.json()["error"]["code"]) == (
        401,
        "signature_invalid",
    )
    assert (forged.status_code, forged.json()["error"]["code"]) == (401, "token_invalid")
    assert (mismatch.status_code, mismatch.json()["error"]["code"]) == (403, "token_mismatch")
    assert (expired.status_code, expired.json()["error"]["code"]) == (401, "token_expired")
    assert (unsigned.status_code, unsigned.json()["error"]["code"]) == (401, "signature_missing")
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "token_missing")
    assert await redis_client.exists(revoked_key(token["token_id"])) == 0
    assert await redis_client.exists(revoked_key(other["token_id"])) == 0
    for response in (wrong_key, forged, mismatch, expired, unsigned):
        _no_secret(response.text)
        assert token["token"] not in response.text


async def test_readiness_and_metrics(token_app: AppFactory) -> None:
    async with token_app() as client:
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
    assert ready.json() == {
        "status": "ready",
        "checks": {"nats": True, "redis": True, "streams": True},
    }
    assert "keyveil_token_issued_total" in metrics.text
    assert "keyveil_ratelimit_decisions_total" in metrics.text


# --- the provider and Redis away ---------------------------------------------------------


async def test_realtime_names_a_provider_that_is_unreachable_or_answers_nonsense(
    token_app: AppFactory,
) -> None:
    """Both are 502 with their own code; auto mode falls back to a proxy token for both."""

    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b'{"expires_at": 1}'  # no `value`: no secret to hand out
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(nonsense, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    answers: dict[str, tuple[httpx.Response, httpx.Response]] = {}
    try:
        for name, url in (
            ("malformed", f"http://127.0.0.1:{port}/v1"),
            ("unreachable", f"http://127.0.0.1:{free_port()}/v1"),
        ):
            async with token_app(OPENAI_BASE_URL=url) as client:
                realtime = await client.post(SECURE, json={"mode": "realtime"}, headers=browser())
                auto = await client.post(SECURE, json={}, headers=browser())
            answers[name] = (realtime, auto)
    finally:
        server.close()
    for name, code in (
        ("malformed", "upstream_malformed"),
        ("unreachable", "upstream_unreachable"),
    ):
        realtime, auto = answers[name]
        assert realtime.status_code == 502, realtime.text
        assert realtime.json()["error"]["code"] == code
        _no_secret(realtime.text)
        assert (auto.json()["mode"], auto.json()["fallback_reason"]) == ("proxy", code)


@pytest.fixture
async def revoked_read_only(redis_url: str, redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A Redis login that may do the token service's admission but only read revocations:
    a least-privilege ACL set up one grant too tight (`~` alone: the empty key the
    admission script passes for a layer it does not use). The URL logs in as it."""
    user, password = f"token-ro-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "+@all", "%R~*",
        "~", "~kv:rl:*", "~kv:nonce:*", "~kv:block:*", "~kv:strikes:*",
    )  # fmt: skip
    yield redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
    await redis_client.execute_command("ACL", "DELUSER", user)


async def test_a_revocation_redis_will_not_store_is_unavailable_not_an_error(
    token_app: AppFactory, redis_client: aioredis.Redis, revoked_read_only: str
) -> None:
    """The signed DELETE passes its checks, then Redis refuses the write (NOPERM): 503
    `revocation_unavailable` with Retry-After, never a 500 or a claim that it worked."""
    async with token_app(REDIS_URL=revoked_read_only) as client:
        token = await _proxy_token(client)
        path, headers = _signed_delete(token)
        answer = await client.delete(path, headers=headers)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "revocation_unavailable"
    assert answer.headers["retry-after"]
    assert await redis_client.exists(revoked_key(token["token_id"])) == 0
