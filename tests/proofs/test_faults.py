"""Fault injection: kill -9 each service, NATS and Redis under steady signed traffic.

For every victim: nothing the clients were answered goes missing from the usage
stream, the auditor processes all of it, no request reaches the provider while Redis
(nonces, limits, revocations) is down, and the system serves again within
RECOVERY_BOUND_S without anyone restarting anything by hand.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import nats
import nats.errors
import pytest
import redis

from shared.events import UsageEvent
from tests.stack import Stack, issue_token, running_stack, signed_headers

pytestmark = pytest.mark.slow

RECOVERY_BOUND_S = 20.0
CHAT_PATH = "/api/voice-agent/proxy/v1/chat/completions"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"VOICE_AGENT_PROXY_RATE_LIMIT": "100000", "VOICE_AGENT_RATE_LIMIT": "10000"}
    with running_stack(tmp_path_factory.mktemp("faults"), env=env) as stack:
        yield stack


@dataclass
class Traffic:
    """Sequential signed chat calls; records each answer with its start and end time."""

    stack: Stack
    answers: list[tuple[float, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def token(self, client: httpx.Client) -> dict[str, str]:
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
        with httpx.Client(timeout=5) as client:
            token = self.token(client)
            proxy = self.stack.url("proxy")
            while not self.stop.is_set():
                headers = signed_headers(
                    token,
                    method="POST",
                    path=CHAT_PATH,
                    body=BODY.encode(),
                    authority=urlsplit(proxy).netloc,
                )
                started = time.monotonic()
                try:
                    status = client.post(
                        f"{proxy}{CHAT_PATH}", content=BODY, headers=headers
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((started, time.monotonic(), status))
                time.sleep(0.02)

    def ok(self) -> int:
        return sum(1 for *_, status in self.answers if status == 200)


@dataclass
class RedisWatch:
    """Intervals during which Redis did not answer a PING."""

    url: str
    down: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        went_down: float | None = None
        while not self.stop.is_set():
            try:
                client.ping()
                if went_down is not None:
                    self.down.append((went_down, time.monotonic()))
                    went_down = None
            except (redis.ConnectionError, redis.TimeoutError):
                went_down = went_down or time.monotonic()
            time.sleep(0.01)


def fake_calls(stack: Stack) -> int:
    return len(httpx.get(f"{stack.info['fake_upstream_url']}/_fake/calls").json()["calls"])


async def usage_events(stack: Stack) -> tuple[list[UsageEvent], int, int]:
    """Every proxy usage event in the stream, its last sequence and the auditor's ack floor."""
    creds = json.loads(Path(stack.info["operator_credential"]).read_text())
    nc = await nats.connect(
        stack.info["nats_url"],
        user=creds["user"],
        password=creds["password"],
        inbox_prefix=b"_INBOX_operator",
    )
    try:
        js = nc.jetstream()
        last = (await js.stream_info("KEYVEIL_USAGE")).state.last_seq
        floor = (await js.consumer_info("KEYVEIL_USAGE", "auditor-usage")).ack_floor.stream_seq
        sub = await js.subscribe("keyveil.usage.proxy", ordered_consumer=True)
        events: list[UsageEvent] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1)
                events.append(UsageEvent.model_validate_json(msg.data))
        except nats.errors.TimeoutError:
            pass
        await sub.unsubscribe()
        return events, int(last), int(floor or 0)
    finally:
        await nc.close()


@pytest.mark.parametrize("victim", ["redis", "nats", "keymanager", "auditor", "token", "proxy"])
async def test_kill_9_under_traffic(fault_stack: Stack, victim: str) -> None:
    stack = fault_stack
    calls_before = fake_calls(stack)
    events_before, _, _ = await usage_events(stack)
    traffic = Traffic(stack)
    watch = RedisWatch(stack.info["redis_url"])
    threads = [threading.Thread(target=traffic.run), threading.Thread(target=watch.run)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while traffic.ok() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert traffic.ok() >= 10, f"no steady traffic before the fault: {traffic.answers[-5:]}"

        killed_at = time.monotonic()
        os.kill(stack.pid(victim), signal.SIGKILL)
        time.sleep(0.5)
        recovered_at: float | None = None
        while time.monotonic() - killed_at < RECOVERY_BOUND_S + 10:
            recent = [a for a in traffic.answers if a[0] > killed_at + 0.5]
            if len(recent) >= 5 and all(status == 200 for *_, status in recent[-5:]):
                recovered_at = recent[-5][0]
                break
            time.sleep(0.1)
        assert recovered_at is not None, f"{victim}: never served again: {traffic.answers[-5:]}"
        recovery_s = recovered_at - killed_at
        assert recovery_s < RECOVERY_BOUND_S, f"{victim}: recovered after {recovery_s:.1f}s"
        time.sleep(0.5)
    finally:
        traffic.stop.set()
        watch.stop.set()
        for thread in threads:
            thread.join(15)

    # Fail closed: no request was answered 200 while Redis could not check its nonce.
    for down_from, down_to in watch.down:
        inside = [a for a in traffic.answers if a[0] > down_from and a[1] < down_to]
        assert all(status != 200 for *_, status in inside), f"{victim}: 200 while Redis down"
    failures = {status for *_, status in traffic.answers if status != 200}
    assert failures <= {0, 502, 503, 504}, f"{victim}: unexpected statuses {failures}"

    # Every request the provider saw was answered to the client (proxy death: one in flight).
    forwarded = fake_calls(stack) - calls_before
    slack = 1 if victim == "proxy" else 0
    assert traffic.ok() <= forwarded <= traffic.ok() + slack

    # Nothing lost: each 200 has its usage event, and the auditor processed the stream.
    deadline = time.monotonic() + 45
    while True:
        events, last, floor = await usage_events(stack)
        new_ok = [e for e in events[len(events_before) :] if e.status == 200]
        if (len(new_ok) >= traffic.ok() and floor >= last) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len({e.event_id for e in new_ok}) >= traffic.ok(), f"{victim}: usage events lost"
    assert floor >= last, f"{victim}: auditor stuck at {floor} of {last}"

    # No manual restart needed: every process is up and ready.
    for name in ("token", "proxy", "keymanager", "auditor"):
        stack.wait_ready(name, timeout=RECOVERY_BOUND_S)
