"""The whole system with `KEYVEIL_AUTH_MODE=oidc` and a usage policy, as `keyveil up` runs it.

A local OIDC issuer (discovery + JWKS) signs the logins; the SDK and the unchanged
`openai` package pass them through; three proxy replicas enforce the policy and cut
a revoked user's tokens.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from keyveil.client import AuthenticationError, KeyveilAuth, SecureAPIClient, TokenSource
from tests.services.token.issuer import TestIssuer
from tests.stack import ORIGIN, Stack, running_stack
from tests.support import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
POLICY = """
[endpoints.chat]
models = ["gpt-4o-mini"]
max_tokens = 512
"""


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def login_stack(tmp_path_factory: pytest.TempPathFactory, idp: TestIssuer) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("login-stack")
    policy = state / "policy.toml"
    policy.write_text(POLICY)
    env = {
        "KEYVEIL_AUTH_MODE": "oidc",
        "OIDC_ISSUER": idp.issuer,
        "OIDC_AUDIENCE": idp.audience,
        "KEYVEIL_POLICY_FILE": str(policy),
        "VOICE_AGENT_RATE_LIMIT": "600",
    }
    args = ("--fake-upstream", "--proxy-replicas", "3")
    with running_stack(state, args=args, env=env) as stack:
        yield stack


def proxy_base(url: str) -> str:
    return f"{url}/api/voice-agent/proxy/v1"


async def test_the_sdk_with_a_login_works_and_without_one_gets_401(
    login_stack: Stack, idp: TestIssuer
) -> None:
    login = idp.login(sub="e2e-user")
    async with SecureAPIClient(
        base_url=login_stack.url("token"), origin=ORIGIN, auth=lambda: login
    ) as sdk:
        reply = await sdk.chat([{"role": "user", "content": "hi"}])
        assert reply["choices"][0]["message"]["content"]
    async with SecureAPIClient(base_url=login_stack.url("token"), origin=ORIGIN) as anonymous:
        with pytest.raises(AuthenticationError) as refused:
            await anonymous.chat([{"role": "user", "content": "hi"}])
        assert refused.value.code == "login_required"


async def test_the_openai_package_with_a_login_and_the_policy(
    login_stack: Stack, idp: TestIssuer
) -> None:
    login = idp.login(sub="openai-user")
    tokens = TokenSource(login_stack.url("token"), origin=ORIGIN, auth=lambda: login)
    http = httpx.AsyncClient(auth=KeyveilAuth(tokens=tokens))
    async with openai.AsyncOpenAI(
        api_key="not-a-provider-key",
        base_url=proxy_base(login_stack.url("proxy")),
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,
    ) as client:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert completion.choices[0].message.content == "Hello from the fake."
        with pytest.raises(openai.PermissionDeniedError) as outside:
            await client.chat.completions.create(model="o1-pro-most-expensive", messages=HELLO)
        assert outside.value.code == "model_not_allowed"
        with pytest.raises(openai.BadRequestError) as over:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, max_tokens=100_000
            )
        assert over.value.code == "policy_limit_exceeded"
        assert "max_tokens" in str(over.value)


async def test_tokens_revoke_user_cuts_the_user_on_three_replicas_within_a_second(
    login_stack: Stack, idp: TestIssuer
) -> None:
    replicas = [str(u) for u in login_stack.info["proxy_urls"]]
    assert len(replicas) == 3
    user = "revoked-user@example.test"
    login, other = idp.login(sub=user), idp.login(sub="someone-else")
    clients = [
        SecureAPIClient(
            base_url=login_stack.url("token"),
            origin=ORIGIN,
            proxy_url=url,
            auth=lambda: login,
        )
        for url in replicas
    ]
    bystander = SecureAPIClient(
        base_url=login_stack.url("token"),
        origin=ORIGIN,
        proxy_url=replicas[0],
        auth=lambda: other,
    )
    try:
        for sdk in [*clients, bystander]:
            await sdk.chat([{"role": "user", "content": "hi"}])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "PROXY_"))}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keyveil.cli",
            "--state-dir",
            str(login_stack.state_dir),
            "tokens",
            "revoke",
            "--user",
            user,
            env={**env, "PYTHONPATH": str(REPO)},
            cwd=Path(login_stack.state_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert user not in out.decode()
        cut_at = time.monotonic()
        for sdk in clients:
            with pytest.raises(AuthenticationError) as refused:
                await sdk.chat([{"role": "user", "content": "hi"}])
            assert refused.value.code == "token_revoked"
        assert time.monotonic() - cut_at < 1.0
        await bystander.chat([{"role": "user", "content": "hi"}])
    finally:
        for sdk in [*clients, bystander]:
            await sdk.aclose()
