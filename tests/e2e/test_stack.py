"""The bones, end to end: token -> signed proxy call -> leased key upstream -> auditor.

Also: a killed service is restarted by `keyveil up`, and no usage event published
meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.stack import (
    CHAT_PATH,
    ORIGIN,
    Stack,
    backlog,
    fake_calls,
    issue_token,
    operator_nats,
    signed_headers,
)
from tests.support import TEST_PROVIDER_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def issue_proxy_token(stack: Stack) -> dict[str, Any]:
    answer = issue_token(stack)
    assert answer.status_code == 200, answer.text
    token = answer.json()
    assert token["mode"] == "proxy"
    return dict(token)


def signed_chat(stack: Stack, token: dict[str, Any]) -> httpx.Response:
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    target = stack.url("proxy")
    headers = signed_headers(
        token, method="POST", path=CHAT_PATH, body=body, authority=urlsplit(target).netloc
    )
    return httpx.post(f"{target}{CHAT_PATH}", content=body, headers=headers, timeout=15)


async def usage_backlog(stack: Stack) -> tuple[int, int]:
    """(last sequence of the usage stream, the auditor's ack floor on it)."""
    nc = await operator_nats(stack)
    try:
        return await backlog(nc, "KEYVEIL_USAGE", "auditor-usage")
    finally:
        await nc.close()


async def wait_auditor_caught_up(stack: Stack, timeout: float = 30.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    last, floor = await usage_backlog(stack)
    while floor < last and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        last, floor = await usage_backlog(stack)
    return last, floor


async def test_signed_chat_completion_end_to_end(stack: Stack) -> None:
    token = issue_proxy_token(stack)
    assert "sk-" not in json.dumps(token)

    answer = signed_chat(stack, token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert TEST_PROVIDER_KEY not in answer.text

    # The provider saw exactly the key the key-manager holds, leased over NATS.
    assert fake_calls(stack)[-1]["authorization"] == f"Bearer {TEST_PROVIDER_KEY}"

    # The usage event reached the auditor through JetStream.
    last, floor = await wait_auditor_caught_up(stack)
    assert last > 0
    assert floor == last


async def test_unsigned_call_is_refused_and_never_forwarded(stack: Stack) -> None:
    token = issue_proxy_token(stack)
    before = len(fake_calls(stack))
    answer = httpx.post(
        f"{stack.url('proxy')}{CHAT_PATH}",
        json={"model": "gpt-4o-mini", "messages": []},
        headers={"Authorization": f"Bearer {token['token']}", "Origin": ORIGIN},
    )
    assert answer.status_code in (400, 401)
    assert "code" in answer.json()["error"]
    assert len(fake_calls(stack)) == before


@pytest.mark.parametrize("victim", ["auditor", "proxy", "keymanager", "token"])
async def test_killed_service_is_restarted_and_no_usage_event_is_lost(
    stack: Stack, victim: str
) -> None:
    token = issue_proxy_token(stack)
    old_pid = stack.pid(victim)
    os.kill(old_pid, signal.SIGKILL)

    # Traffic while the victim is down: answers may fail only for the victim's own path.
    answered = 0
    for _ in range(5):
        try:
            if signed_chat(stack, token).status_code == 200:
                answered += 1
        except httpx.HTTPError:
            pass
    recovery_s = stack.wait_ready(victim, old_pid=old_pid, timeout=45)
    assert stack.pid(victim) != old_pid
    assert recovery_s < 45

    # Serving again after the restart.
    fresh = issue_proxy_token(stack)
    assert signed_chat(stack, fresh).status_code == 200
    if victim in ("auditor", "keymanager"):
        assert answered == 5  # the proxy path does not depend on them once a lease is cached

    # Every usage event published, before, during and after, is processed by the auditor.
    last, floor = await wait_auditor_caught_up(stack, timeout=45)
    assert floor == last


def test_servers_and_the_fake_get_no_secret_and_redis_wants_a_password(stack: Stack) -> None:
    """The red-team finding: nats-server and the fake upstream inherited OPENAI_API_KEY,
    KEY_ENCRYPTION_SECRET and PROXY_SIGNING_KEY; the local Redis had no password."""
    import redis

    generated = json.loads((stack.state_dir / "dev-secrets.json").read_text())
    secrets_held = [TEST_PROVIDER_KEY, *generated.values()]
    checked = 0
    for name in ("nats", "redis", "fake-upstream"):
        environ = Path(f"/proc/{stack.pid(name)}/environ").read_bytes()
        assert environ, name
        for secret in secrets_held:
            assert secret.encode() not in environ, name
        checked += 1
    assert checked == 3
    for name in ("token", "proxy"):  # the services that need one still get theirs
        environ = Path(f"/proc/{stack.pid(name)}/environ").read_bytes()
        assert generated["PROXY_SIGNING_KEY"].encode() in environ
        assert TEST_PROVIDER_KEY.encode() not in environ

    url = urlsplit(stack.info["redis_url"])
    assert url.password
    anonymous = redis.Redis(host=url.hostname, port=url.port, socket_timeout=2)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()


def test_audit_verify_passes_on_the_running_stack_with_no_flags(stack: Stack) -> None:
    """keyveil up gives the auditor its ledger key and checkpoint directory and keeps the
    public key in the state dir, so an operator's `keyveil audit verify` just works."""
    import subprocess
    import sys

    from tests.support import REPO

    token = issue_proxy_token(stack)
    assert signed_chat(stack, token).status_code == 200
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyveil.cli",
            "audit",
            "verify",
            "--state-dir",
            str(stack.state_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "LEDGER_"))},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok"), result.stdout
    assert (stack.state_dir / "ledger" / "verify.keys").read_text().strip()
