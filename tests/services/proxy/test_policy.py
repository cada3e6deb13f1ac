"""The usage policy, the per-user limit and user revocation on three real proxy processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from keyveil.servers import ServerProcess
from shared.principals import PrincipalHasher
from shared.tokens import ProxyClaims, Scope
from tests.services.proxy.conftest import (
    CHAT,
    ORIGIN,
    SPEECH,
    STT,
    Browser,
    Token,
    chat_body,
    multipart,
    proxy_env,
)
from tests.support import REPO, TEST_PROXY_SIGNING_KEY, FakeUpstream, ServiceProcess

pytestmark = [pytest.mark.slow]

POLICY = """
[endpoints.chat]
models = ["gpt-4o-mini"]
max_tokens = 256
max_n = 1

[endpoints.speech]
models = ["gpt-4o-mini-tts"]
max_input_chars = 50

[endpoints.transcription]
models = ["whisper-1"]

[tiers.pro.endpoints.chat]
models = ["gpt-4o-mini", "gpt-4o"]
max_tokens = 4096

[tiers.clamped.endpoints.chat]
over_cap = "clamp"
"""
USER_LIMIT = 8
HASHER = PrincipalHasher.from_secrets(principal_key=None, signing_key=TEST_PROXY_SIGNING_KEY)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="module")
def proxies(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    policy_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServiceProcess]]:
    logs = tmp_path_factory.mktemp("policy-proxies")
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        KEYVEIL_POLICY_FILE=str(policy_file),
        VOICE_AGENT_USER_RATE_LIMIT=str(USER_LIMIT),
    )
    started = [ServiceProcess("proxy", env, logs / f"proxy-{i}.log") for i in range(3)]
    for process in started:
        process.start(wait_ready=False)
    try:
        for process in started:
            process.wait_ready()
        yield started
    finally:
        for process in started:
            process.stop()


@pytest.fixture
async def browsers(proxies: list[ServiceProcess]) -> AsyncIterator[list[Browser]]:
    clients = [Browser(p.url) for p in proxies]
    yield clients
    for client in clients:
        await client.close()


def user_token(browser: Browser, user: str | None, tier: str | None = None) -> Token:
    now = int(time.time())
    claims = ProxyClaims(
        jti=uuid.uuid4().hex,
        sid=f"sess-{uuid.uuid4().hex[:8]}",
        scopes=[Scope.chat, Scope.speech, Scope.transcriptions],
        iat=now,
        exp=now + 300,
        origin=ORIGIN,
        sub=HASHER.hash(user) if user else None,
        app="app.example.com",
        tier=tier,
    )
    value = browser.keyring.issue(claims)
    return Token(value, claims, browser.keyring.request_signing_key(value, claims.jti))


def _code(answer: object) -> tuple[int, str]:
    import httpx

    assert isinstance(answer, httpx.Response)
    return answer.status_code, answer.json()["error"]["code"]


# --- models and caps ----------------------------------------------------------------------


async def test_a_model_outside_the_policy_never_reaches_the_provider(
    browsers: list[Browser], upstream: FakeUpstream
) -> None:
    browser = browsers[0]
    token = user_token(browser, "alice")
    answer = await browser.post(CHAT, chat_body(model="o1-pro-most-expensive"), token)
    assert _code(answer) == (403, "model_not_allowed")
    no_model = await browser.post(CHAT, orjson.dumps({"messages": []}), token)
    assert _code(no_model) == (400, "model_required")
    pro_only = await browser.post(CHAT, chat_body(model="gpt-4o"), token)
    assert _code(pro_only) == (403, "model_not_allowed")
    body, content_type = multipart(b"RIFF....WAVE", model="gpt-4o-transcribe")
    stt = await browser.post(STT, body, token, content_type=content_type)
    assert _code(stt) == (403, "model_not_allowed")
    speech = orjson.dumps({"model": "tts-1-hd", "input": "hi", "voice": "alloy"})
    assert _code(await browser.post(SPEECH, speech, token)) == (403, "model_not_allowed")
    assert upstream.calls() == []


async def test_over_a_cap_is_a_400_naming_the_limit_and_nothing_goes_upstream(
    browsers: list[Browser], upstream: FakeUpstream
) -> None:
    browser = browsers[1]
    token = user_token(browser, "bob")
    for field in ("max_tokens", "max_completion_tokens"):
        answer = await browser.post(CHAT, chat_body(**{field: 100_000}), token)
        assert _code(answer) == (400, "policy_limit_exceeded")
        assert field in answer.json()["error"]["message"]
        assert "256" in answer.json()["error"]["message"]
    assert _code(await browser.post(CHAT, chat_body(n=3), token)) == (400, "policy_limit_exceeded")
    speech = orjson.dumps({"model": "gpt-4o-mini-tts", "input": "x" * 51, "voice": "alloy"})
    answer = await browser.post(SPEECH, speech, token)
    assert _code(answer) == (400, "policy_limit_exceeded")
    assert "input length" in answer.json()["error"]["message"]
    assert upstream.calls() == []
    ok = await browser.post(CHAT, chat_body(max_tokens=256), token)
    assert ok.status_code == 200, ok.text
    assert len(upstream.calls()) == 1


async def test_a_tier_widens_the_base_rules_and_a_clamping_tier_lowers_the_value(
    browsers: list[Browser], upstream: FakeUpstream
) -> None:
    browser = browsers[2]
    pro = user_token(browser, "carol", tier="pro")
    answer = await browser.post(CHAT, chat_body(model="gpt-4o", max_tokens=4000), pro)
    assert answer.status_code == 200, answer.text
    over = await browser.post(CHAT, chat_body(model="gpt-4o", max_tokens=5000), pro)
    assert _code(over) == (400, "policy_limit_exceeded")
    clamped = user_token(browser, "dave", tier="clamped")
    asked = chat_body(max_tokens=100_000)
    answer = await browser.post(CHAT, asked, clamped)
    assert answer.status_code == 200, answer.text
    calls = upstream.calls()
    assert len(calls) == 2
    sent = orjson.dumps({**orjson.loads(asked), "max_tokens": 256})
    assert calls[-1]["body_size"] == len(sent) < len(asked)
    unknown = user_token(browser, "erin", tier="no-such-tier")  # the base rules
    assert _code(await browser.post(CHAT, chat_body(model="gpt-4o"), unknown))[0] == 403


async def test_the_policy_reloads_when_the_file_changes_and_survives_a_bad_edit(
    browsers: list[Browser], upstream: FakeUpstream, policy_file: Path
) -> None:
    async def status_everywhere(model: str) -> set[int]:
        codes = set()
        for browser in browsers:
            token = user_token(browser, f"reload-{uuid.uuid4().hex[:6]}")
            codes.add((await browser.post(CHAT, chat_body(model=model), token)).status_code)
        return codes

    async def until(model: str, wanted: int) -> None:
        deadline = time.monotonic() + 10
        while (codes := await status_everywhere(model)) != {wanted}:
            assert time.monotonic() < deadline, codes
            await asyncio.sleep(0.2)

    assert await status_everywhere("gpt-4.1") == {403}
    try:
        policy_file.write_text(POLICY.replace('models = ["gpt-4o-mini"]', 'models = ["gpt-4.1"]'))
        await until("gpt-4.1", 200)
        assert await status_everywhere("gpt-4o-mini") == {403}
        policy_file.write_text("[endpoints.chat]\nmax_tokens = -5\n")  # invalid: ignored
        await asyncio.sleep(2.5)
        assert await status_everywhere("gpt-4.1") == {200}
    finally:
        policy_file.write_text(POLICY)
    await until("gpt-4o-mini", 200)
    assert await status_everywhere("gpt-4.1") == {403}


# --- per-user limits and revocation -------------------------------------------------------


async def test_the_per_user_limit_spans_tokens_and_replicas(
    browsers: list[Browser], upstream: FakeUpstream, bus: NATS
) -> None:
    user = f"frank-{uuid.uuid4().hex[:6]}"
    seen: list[dict[str, Any]] = []

    async def record(msg: Msg) -> None:
        seen.append(orjson.loads(msg.data))

    sub = await bus.subscribe("keyveil.usage.>", cb=record)
    await bus.flush()
    first = user_token(browsers[0], user)
    for i in range(5):  # the per-token limit (5/min), spread over the replicas
        answer = await browsers[i % 3].post(CHAT, chat_body(), first)
        assert answer.status_code == 200, answer.text
    second = user_token(browsers[0], user)
    for i in range(USER_LIMIT - 5):
        assert (await browsers[i % 3].post(CHAT, chat_body(), second)).status_code == 200
    refused = await browsers[2].post(CHAT, chat_body(), second)
    assert _code(refused) == (429, "rate_limited")
    assert refused.headers["ratelimit-policy"].startswith('"per-user"')
    other = user_token(browsers[0], f"grace-{uuid.uuid4().hex[:6]}")
    assert (await browsers[2].post(CHAT, chat_body(), other)).status_code == 200
    await asyncio.sleep(0.5)
    await sub.unsubscribe()
    mine = [e for e in seen if e.get("token_id") in (first.claims.jti, second.claims.jti)]
    assert len(mine) == USER_LIMIT + 1
    assert {e["user"] for e in mine} == {HASHER.hash(user)}
    assert {e["app"] for e in mine} == {"app.example.com"}
    assert user not in orjson.dumps(seen).decode()


async def _cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyveil.cli",
        "--state-dir",
        str(cwd),
        *args,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_revoke_user_cuts_every_token_of_that_user_on_every_replica(
    browsers: list[Browser], upstream: FakeUpstream, redis_url: str, tmp_path: Path
) -> None:
    user = f"mallory-{uuid.uuid4().hex[:6]}@example.test"
    tokens = [user_token(b, user) for b in browsers]
    bystander = user_token(browsers[0], f"trent-{uuid.uuid4().hex[:6]}")
    for browser, token in zip(browsers, tokens, strict=True):
        assert (await browser.post(CHAT, chat_body(), token)).status_code == 200
    env = {"REDIS_URL": redis_url, "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY, "NATS_URL": ""}
    code, out, err = await _cli("tokens", "revoke", "--user", user, env=env, cwd=tmp_path)
    assert code == 0, err
    assert user not in out
    assert HASHER.hash(user) in out
    cut_at = time.monotonic()
    for browser in browsers:  # every replica, every token of the user
        for token in tokens:
            answer = await browser.post(CHAT, chat_body(), token)
            assert _code(answer) == (401, "token_revoked")
    assert time.monotonic() - cut_at < 1.0
    assert (await browsers[1].post(CHAT, chat_body(), bystander)).status_code == 200
    await asyncio.sleep(1.1)  # a token issued after the revocation works
    fresh = user_token(browsers[0], user)
    assert (await browsers[2].post(CHAT, chat_body(), fresh)).status_code == 200
