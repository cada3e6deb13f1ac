"""Run the whole system the way `keyveil up` runs it, for end-to-end and proof suites."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import nats
import nats.errors
from nats.aio.client import Client as NATS

from shared.bus import server_urls
from shared.events import UsageEvent
from tests.support import REPO, TEST_PROVIDER_KEY

ORIGIN = "http://localhost:5173"
_INHERITED_SECRETS = ("OPENAI_", "NATS_", "REDIS_", "KEY_ENCRYPTION", "PROXY_SIGNING")


class Stack:
    """A running `keyveil up` and what its stack.json says."""

    def __init__(self, state_dir: Path, process: subprocess.Popen[bytes]) -> None:
        self.state_dir = state_dir
        self.process = process

    @property
    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "stack.json").read_text())
        return data

    def url(self, name: str) -> str:
        return str(self.info[f"{name}_url"])

    def pid(self, name: str) -> int:
        return int(self.info["pids"][name])

    def log(self, name: str) -> str:
        return Path(self.info["logs"][name]).read_text(errors="replace")

    def wait_ready(self, name: str, *, timeout: float = 30.0, old_pid: int | None = None) -> float:
        """Seconds until `name` (restarted, when `old_pid` is given) answers /readyz."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            try:
                if old_pid is None or self.pid(name) != old_pid:
                    url = self.info["metrics_urls"][name].removesuffix("/metrics")
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        return time.monotonic() - started
            except (httpx.HTTPError, KeyError, ValueError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready within {timeout}s")


@contextmanager
def running_stack(
    state_dir: Path,
    *,
    args: Sequence[str] = ("--fake-upstream",),
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[Stack]:
    """`keyveil up --base-port 0 --state-dir D <args>` until ready; Ctrl-C on exit."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_SECRETS)}
    child_env.update(
        OPENAI_API_KEY=TEST_PROVIDER_KEY, ALLOWED_ORIGINS=ORIGIN, NODE_ENV="development"
    )
    child_env.update(env or {})
    argv = [sys.executable, "-m", "keyveil.cli", "up", "--base-port", "0"]
    argv += ["--state-dir", str(state_dir), *args]
    with (state_dir / "up.log").open("wb") as log:
        process = subprocess.Popen(
            argv, env=child_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    stack = Stack(state_dir, process)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError((state_dir / "up.log").read_text())
            try:
                if stack.info.get("ready"):
                    break
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                tail = (state_dir / "up.log").read_text()[-4000:]
                raise TimeoutError(f"keyveil up not ready:\n{tail}")
            time.sleep(0.2)
        yield stack
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def issue_token(stack: Stack, mode: str = "proxy", **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{stack.url('token')}/api/voice-agent/secure-token",
        json={"mode": mode, **extra},
        headers={"Origin": ORIGIN},
        timeout=10,
    )


def signed_headers(
    token: Mapping[str, Any],
    *,
    method: str,
    path: str,
    body: bytes | None,
    authority: str,
    content_type: str | None = "application/json",
) -> dict[str, str]:
    """Everything a browser sends the proxy: bearer token, RFC 9421 signature, Origin."""
    from shared.crypto import b64url_decode
    from shared.signing import sign_request

    headers = sign_request(
        method=method,
        path=path,
        key=b64url_decode(str(token["signing_key"])),
        keyid=str(token["token_id"]),
        body=body,
        authority=authority,
    )
    headers.update({"Authorization": f"Bearer {token['token']}", "Origin": ORIGIN})
    if content_type:
        headers["Content-Type"] = content_type
    return headers


CHAT_PATH = "/api/voice-agent/proxy/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@dataclass
class Traffic:
    """Steady sequential signed chat calls; records each answer with start and end time."""

    stack: Stack
    answers: list[tuple[float, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _token(self) -> dict[str, Any]:
        while not self.stop.is_set():
            try:
                answer = issue_token(self.stack)
                if answer.status_code == 200:
                    return dict(answer.json())
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return {}

    def run(self) -> None:
        token = self._token()
        proxy = self.stack.url("proxy")
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                headers = signed_headers(
                    token,
                    method="POST",
                    path=CHAT_PATH,
                    body=CHAT_BODY.encode(),
                    authority=urlsplit(proxy).netloc,
                )
                started = time.monotonic()
                try:
                    url = f"{proxy}{CHAT_PATH}"
                    status = client.post(url, content=CHAT_BODY, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((started, time.monotonic(), status))
                time.sleep(0.02)

    def ok(self) -> int:
        return sum(1 for *_, status in self.answers if status == 200)


def fake_calls(stack: Stack) -> list[dict[str, Any]]:
    """What the fake provider received (path, Authorization header, size)."""
    calls: list[dict[str, Any]] = httpx.get(
        f"{stack.info['fake_upstream_url']}/_fake/calls"
    ).json()["calls"]
    return calls


async def operator_nats(stack: Stack, user: str = "operator") -> NATS:
    """A NATS connection as `user` (`operator` or `observer`), or plain without NATS auth."""
    credential = stack.info.get(f"{user}_credential")
    options: dict[str, Any] = {"servers": server_urls(stack.info["nats_url"])}
    if credential:
        creds = json.loads(Path(credential).read_text())
        options.update(
            user=creds["user"], password=creds["password"], inbox_prefix=f"_INBOX_{user}".encode()
        )
    return await nats.connect(**options)


async def read_stream(nc: NATS, subject: str) -> list[bytes]:
    """Every message on `subject` in its stream, oldest first (an ephemeral consumer)."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    messages: list[bytes] = []
    try:
        while True:
            messages.append((await sub.next_msg(timeout=1)).data)
    except nats.errors.TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return messages


async def backlog(nc: NATS, stream: str, durable: str) -> tuple[int, int]:
    """(last sequence of `stream`, the ack floor of consumer `durable` on it)."""
    js = nc.jetstream()
    last = (await js.stream_info(stream)).state.last_seq
    floor = (await js.consumer_info(stream, durable)).ack_floor.stream_seq
    return int(last), int(floor or 0)


async def proxy_usage(stack: Stack) -> tuple[list[UsageEvent], int, int]:
    """Every proxy usage event, the usage stream's last sequence and the auditor's ack floor."""
    nc = await operator_nats(stack)
    try:
        last, floor = await backlog(nc, "KEYVEIL_USAGE", "auditor-usage")
        raw = await read_stream(nc, "keyveil.usage.proxy")
        return [UsageEvent.model_validate_json(m) for m in raw], last, floor
    finally:
        await nc.close()
